//! Which event may go next when a destination has several requests in
//! flight: events with the same ordering key go one at a time, in commit
//! order; events with different keys go in parallel. An event without a
//! key is a barrier: it waits for everything before it, and everything
//! after it waits for it (statement-level messages, TRUNCATE, tables
//! without a primary key, `send_message` without a key: their order
//! against every other event of the destination is kept).
//!
//! Pure bookkeeping over event indexes; the caller sends and reports back.

use std::collections::HashMap;

/// How a destination's events flow: what a stored destination's options
/// say, or the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flow {
    /// HTTP requests in flight at once (1: one after the other).
    pub concurrency: usize,
    /// What may overtake what when several are in flight.
    pub order: Order,
    /// HTTP: events per request (a JSON array when more than one).
    pub batch: usize,
    /// HTTP: most events per second, if limited.
    pub max_rate: Option<f64>,
}

impl Flow {
    /// TCP: one stream, in commit order.
    pub const SERIAL: Flow = Flow {
        concurrency: 1,
        order: Order::Destination,
        batch: 1,
        max_rate: None,
    };
    /// HTTP without options.
    pub const HTTP: Flow = Flow {
        concurrency: DEFAULT_CONCURRENCY,
        order: Order::Key,
        batch: 1,
        max_rate: None,
    };
}

/// HTTP requests in flight per destination unless its options say: enough
/// that a receiver taking 20 ms per request gets 1,600 a second, few enough
/// to be polite to one that is small.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// An event's key, from where it is made to its sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Key<'a> {
    /// Its ordering key ([`key_hash`]); `None`: a barrier.
    pub order: Option<i64>,
    /// The key as text, for destinations that carry it
    /// ([`crate::sink::Broker::record_keys`]).
    pub text: Option<&'a str>,
}

impl Key<'_> {
    /// Just an ordering key.
    pub fn order(order: Option<i64>) -> Self {
        Key { order, text: None }
    }
}

/// An ordering key from its parts (a table's oid, then each key column's
/// bytes, `None` for NULL): FNV-1a, whose values stay the same across Rust
/// releases and builds. Equal keys give equal hashes; a collision only
/// makes two keys wait for each other.
pub fn key_hash<'a>(parts: impl IntoIterator<Item = Option<&'a [u8]>>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for part in parts {
        match part {
            None => eat(0),
            Some(bytes) => {
                eat(1);
                for &b in (bytes.len() as u32).to_le_bytes().iter().chain(bytes) {
                    eat(b);
                }
            }
        }
    }
    h as i64
}

/// How a destination orders its events when several are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Same key in commit order, one at a time; different keys in parallel.
    #[default]
    Key,
    /// Strict commit order: one event at a time.
    Destination,
    /// No order: any event may overtake any other.
    None,
}

/// Events looked at past the first unfinished one: bounds the work per
/// decision on a job of a hundred thousand events.
const WINDOW: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Done,
    /// Failed in this job: its keys are held back (a failed barrier holds
    /// everything after it) until the next job retries it.
    Failed,
}

/// One thing sent at once: an event, or a batch of events in one request.
#[derive(Debug)]
struct Unit {
    keys: Vec<i64>,
    /// Holds an event without a key.
    barrier: bool,
}

/// Hands out unit indexes `0..n` (events, or batches of events)
/// respecting per-key order: a unit waits while any of its keys is in an
/// earlier unit that is not done.
#[derive(Debug)]
pub struct Scheduler {
    units: Vec<Unit>,
    state: Vec<State>,
    /// Every unit before this one is done.
    done_below: usize,
    /// Keys in flight.
    busy: HashMap<i64, usize>,
    /// In flight, all units together.
    in_flight: usize,
    /// A barrier is in flight.
    barrier: bool,
    /// No more units are handed out (shutdown, or the time slice is used
    /// up).
    stopped: bool,
}

impl Scheduler {
    /// One unit per event.
    pub fn new(keys: Vec<Option<i64>>) -> Self {
        Self::batched(keys.into_iter().map(|k| vec![k]).collect())
    }

    /// One unit per batch of events (their keys, in order).
    pub fn batched(batches: Vec<Vec<Option<i64>>>) -> Self {
        let units: Vec<Unit> = batches
            .into_iter()
            .map(|keys| Unit {
                barrier: keys.iter().any(Option::is_none),
                keys: keys.into_iter().flatten().collect(),
            })
            .collect();
        let n = units.len();
        Scheduler {
            units,
            state: vec![State::Waiting; n],
            done_below: 0,
            busy: HashMap::new(),
            in_flight: 0,
            barrier: false,
            stopped: false,
        }
    }

    /// The next unit that may be sent now, marked in flight; `None` when
    /// none may (wait for a completion) or none is left.
    pub fn take(&mut self) -> Option<usize> {
        let i = self.next()?;
        let unit = &self.units[i];
        self.state[i] = State::InFlight;
        self.in_flight += 1;
        self.barrier = unit.barrier;
        for &k in &unit.keys {
            *self.busy.entry(k).or_default() += 1;
        }
        Some(i)
    }

    /// The unit [`Scheduler::take`] would hand out.
    fn next(&self) -> Option<usize> {
        if self.stopped || self.barrier {
            return None;
        }
        let end = self.units.len().min(self.done_below + WINDOW);
        // Keys of earlier units that are not done: later units with one of
        // these keys must wait.
        let mut blocked: Vec<i64> = Vec::new();
        for i in self.done_below..end {
            let unit = &self.units[i];
            match self.state[i] {
                State::Done => {}
                State::InFlight | State::Failed if unit.barrier => return None,
                State::InFlight | State::Failed => blocked.extend(&unit.keys),
                // A barrier goes only when everything before it is done.
                State::Waiting if unit.barrier => {
                    return (self.in_flight == 0 && i == self.done_below).then_some(i);
                }
                State::Waiting => {
                    let free = unit
                        .keys
                        .iter()
                        .all(|k| !blocked.contains(k) && !self.busy.contains_key(k));
                    if free {
                        return Some(i);
                    }
                    blocked.extend(&unit.keys);
                }
            }
        }
        None
    }

    /// Unit `i` finished. A failed unit holds its keys back for the rest
    /// of the job (everything, for a barrier); other keys go on, so one
    /// event's failure costs only the events that must follow it.
    pub fn finish(&mut self, i: usize, ok: bool) {
        debug_assert_eq!(self.state[i], State::InFlight);
        self.in_flight -= 1;
        if self.units[i].barrier {
            self.barrier = false;
        }
        for k in &self.units[i].keys {
            if let Some(n) = self.busy.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(k);
                }
            }
        }
        if ok {
            self.state[i] = State::Done;
            while self.done_below < self.state.len() && self.state[self.done_below] == State::Done {
                self.done_below += 1;
            }
        } else {
            self.state[i] = State::Failed;
        }
    }

    /// Stops handing out units at once (shutdown).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether nothing is in flight and nothing more will be handed out.
    pub fn finished(&self) -> bool {
        self.in_flight == 0 && self.next().is_none()
    }

    /// Units delivered in order from the start.
    pub fn done_prefix(&self) -> usize {
        self.done_below
    }

    /// Whether unit `i` was delivered (also after an earlier one failed:
    /// it is recorded as delivered and never sent again).
    pub fn is_done(&self, i: usize) -> bool {
        self.state[i] == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Scheduler, limit: usize) -> Vec<usize> {
        let mut out = Vec::new();
        while out.len() < limit {
            match s.take() {
                Some(i) => out.push(i),
                None => break,
            }
        }
        out
    }

    #[test]
    fn key_hashes_are_stable_and_tell_parts_apart() {
        assert_eq!(key_hash([Some(&b"ab"[..])]), key_hash([Some(&b"ab"[..])]));
        assert_ne!(
            key_hash([Some(&b"ab"[..]), Some(&b""[..])]),
            key_hash([Some(&b"a"[..]), Some(&b"b"[..])])
        );
        assert_ne!(key_hash([None]), key_hash([Some(&b""[..])]));
        // Pinned: queued keys must mean the same after an upgrade.
        assert_eq!(key_hash([Some(&b"1"[..])]), 0x07fd_4af1_b8fa_c224_i64);
    }

    #[test]
    fn different_keys_go_together_same_key_one_at_a_time() {
        let mut s = Scheduler::new(vec![Some(1), Some(2), Some(1), Some(3)]);
        assert_eq!(drain(&mut s, 10), vec![0, 1, 3]);
        s.finish(0, true);
        assert_eq!(drain(&mut s, 10), vec![2]);
        for i in [1, 2, 3] {
            s.finish(i, true);
        }
        assert!(s.finished());
        assert_eq!(s.done_prefix(), 4);
    }

    #[test]
    fn a_key_waits_for_its_earlier_event_even_when_other_keys_finish() {
        let mut s = Scheduler::new(vec![Some(1), Some(1), Some(2), Some(2)]);
        assert_eq!(drain(&mut s, 10), vec![0, 2]);
        s.finish(2, true);
        assert_eq!(drain(&mut s, 10), vec![3]);
        s.finish(3, true);
        // Event 1 still waits for 0.
        assert_eq!(drain(&mut s, 10), Vec::<usize>::new());
        assert_eq!(s.done_prefix(), 0);
        s.finish(0, true);
        assert_eq!(drain(&mut s, 10), vec![1]);
        s.finish(1, true);
        assert_eq!(s.done_prefix(), 4);
    }

    #[test]
    fn a_barrier_waits_for_all_before_and_holds_all_after() {
        let mut s = Scheduler::new(vec![Some(1), Some(2), None, Some(3)]);
        assert_eq!(drain(&mut s, 10), vec![0, 1]);
        s.finish(0, true);
        assert_eq!(drain(&mut s, 10), Vec::<usize>::new());
        s.finish(1, true);
        assert_eq!(drain(&mut s, 10), vec![2]);
        assert_eq!(drain(&mut s, 10), Vec::<usize>::new());
        s.finish(2, true);
        assert_eq!(drain(&mut s, 10), vec![3]);
    }

    #[test]
    fn batches_wait_for_every_key_they_hold() {
        // [1,2] [3] [2,4] [5]: the third shares key 2 with the first.
        let mut s = Scheduler::batched(vec![
            vec![Some(1), Some(2)],
            vec![Some(3)],
            vec![Some(2), Some(4)],
            vec![Some(5)],
        ]);
        assert_eq!(drain(&mut s, 10), vec![0, 1, 3]);
        s.finish(0, true);
        assert_eq!(drain(&mut s, 10), vec![2]);
        let mut b = Scheduler::batched(vec![vec![Some(1)], vec![Some(2), None], vec![Some(3)]]);
        assert_eq!(drain(&mut b, 10), vec![0]);
        b.finish(0, true);
        assert_eq!(drain(&mut b, 10), vec![1]);
        b.finish(1, true);
        assert_eq!(drain(&mut b, 10), vec![2]);
    }

    #[test]
    fn a_stop_lets_what_is_in_flight_finish() {
        let mut s = Scheduler::new(vec![Some(1), Some(2), Some(3)]);
        assert_eq!(drain(&mut s, 2), vec![0, 1]);
        s.stop();
        assert_eq!(s.take(), None);
        assert!(!s.finished());
        s.finish(1, true);
        s.finish(0, true);
        assert!(s.finished());
        assert_eq!(s.done_prefix(), 2);
    }

    #[test]
    fn a_failure_holds_back_its_key_and_nothing_else() {
        // Keys 1, 2, 1, 3, 2.
        let mut s = Scheduler::new(vec![Some(1), Some(2), Some(1), Some(3), Some(2)]);
        assert_eq!(drain(&mut s, 3), vec![0, 1, 3]);
        s.finish(0, false);
        s.finish(1, true);
        s.finish(3, true);
        // Key 1's second event waits for its first, which failed; key 2's
        // next event goes.
        assert_eq!(drain(&mut s, 10), vec![4]);
        s.finish(4, true);
        assert!(s.finished());
        assert_eq!(s.done_prefix(), 0);
        let done: Vec<bool> = (0..5).map(|i| s.is_done(i)).collect();
        assert_eq!(done, [false, true, false, true, true]);
    }

    #[test]
    fn a_failed_barrier_holds_back_everything_after_it() {
        let mut s = Scheduler::new(vec![Some(1), None, Some(2)]);
        assert_eq!(drain(&mut s, 10), vec![0]);
        s.finish(0, true);
        assert_eq!(drain(&mut s, 10), vec![1]);
        s.finish(1, false);
        assert_eq!(s.take(), None);
        assert!(s.finished());
        assert!(!s.is_done(2));
    }

    #[test]
    fn a_random_run_keeps_per_key_order() {
        // Deterministic pseudo-random completions.
        let keys: Vec<Option<i64>> = (0..500)
            .map(|i| {
                if i % 97 == 0 {
                    None
                } else {
                    Some((i * 7919) % 13)
                }
            })
            .collect();
        let mut s = Scheduler::new(keys.clone());
        let mut flying: Vec<usize> = Vec::new();
        let mut order = Vec::new();
        let mut x: u64 = 42;
        while !s.finished() {
            while flying.len() < 8 {
                match s.take() {
                    Some(i) => flying.push(i),
                    None => break,
                }
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let j = (x >> 33) as usize % flying.len();
            let i = flying.swap_remove(j);
            order.push(i);
            s.finish(i, true);
        }
        assert_eq!(order.len(), 500);
        for k in 0..13 {
            let seq: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| keys[i] == Some(k))
                .collect();
            assert!(seq.windows(2).all(|w| w[0] < w[1]), "key {k}: {seq:?}");
        }
        // Barriers complete after everything before them, before anything after.
        for (pos, &i) in order.iter().enumerate() {
            if keys[i].is_none() {
                assert!(order[..pos].iter().all(|&j| j < i));
                assert!(order[pos + 1..].iter().all(|&j| j > i));
            }
        }
    }
}
