//! Events held in backend memory until the transaction ends.
//!
//! Savepoints are handled with a stack of marks rather than per-event
//! subtransaction ids: events are appended in order, so everything a
//! subtransaction added is the tail after its mark. `ROLLBACK TO SAVEPOINT`
//! truncates to the mark, `RELEASE` just drops the mark; both O(1), so a
//! plpgsql loop with an exception block per row stays linear.
//!
//! All messages share one byte arena: a million small events are two
//! vectors, not a million allocations.

use crate::schedule::Key;

/// Held events for destinations of type `K`. Destinations are interned: a
/// transaction usually talks to one or two, and events refer to them by
/// index.
#[derive(Debug)]
pub struct Pending<K> {
    dests: Vec<K>,
    bytes: Vec<u8>,
    events: Vec<Held>,
    /// Bytes of the events' [`Key::text`]s, held beside the arena and
    /// counted against the limit with it.
    texts: usize,
    /// (subtransaction id, events.len(), bytes.len()) at its start.
    marks: Vec<(u32, usize, usize)>,
    /// The ordinal of the next event: its place among all events of the
    /// transaction, kept when earlier ones leave the buffer.
    next_ordinal: u64,
}

impl<K> Default for Pending<K> {
    fn default() -> Self {
        Pending {
            dests: Vec::new(),
            bytes: Vec::new(),
            events: Vec::new(),
            texts: 0,
            marks: Vec::new(),
            next_ordinal: 0,
        }
    }
}

/// One held event; its message ends at `end` in the arena.
#[derive(Debug)]
struct Held {
    dest: u32,
    end: usize,
    ordinal: u64,
    key: Option<i64>,
    /// [`Key::text`]: rare (destinations that ask for it), so allocated.
    text: Option<Box<str>>,
}

/// Held events exceed the limit; nothing was added.
#[derive(Debug, PartialEq, Eq)]
pub struct Full {
    pub limit: usize,
}

impl<K: PartialEq + Clone> Pending<K> {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    /// Adds one message for `dest`, refusing to grow past `limit` bytes.
    pub fn push(&mut self, dest: &K, msg: &[u8], limit: usize) -> Result<(), Full> {
        self.push_to(|d| d == dest, || dest.clone(), msg, Key::default(), limit)
    }

    /// [`Pending::push`] with the message's key (see [`crate::schedule`]),
    /// to the destination `is` recognises, made by `make` only the first
    /// time: a destination is cloned once per transaction, not once per
    /// event.
    pub fn push_to(
        &mut self,
        is: impl Fn(&K) -> bool,
        make: impl FnOnce() -> K,
        msg: &[u8],
        key: Key<'_>,
        limit: usize,
    ) -> Result<(), Full> {
        let text = key.text.map_or(0, str::len);
        if self.bytes.len() + self.texts + msg.len() + text > limit {
            return Err(Full { limit });
        }
        self.texts += text;
        let idx = match self.dests.iter().position(is) {
            Some(i) => i,
            None => {
                self.dests.push(make());
                self.dests.len() - 1
            }
        } as u32;
        self.bytes.extend_from_slice(msg);
        self.events.push(Held {
            dest: idx,
            end: self.bytes.len(),
            ordinal: self.next_ordinal,
            key: key.order,
            text: key.text.map(Box::from),
        });
        self.next_ordinal += 1;
        Ok(())
    }

    /// Bytes held by the current (sub)transaction level: what it can write
    /// out itself, since its own rollback would take its writes along.
    pub fn current_level_bytes(&self) -> usize {
        self.bytes.len() - self.marks.last().map_or(0, |&(_, _, bytes)| bytes)
    }

    /// Bytes the enclosing level will hold once the current one is
    /// released into it.
    pub fn enclosing_level_bytes(&self) -> usize {
        let start = match self.marks.len() {
            0 | 1 => 0,
            n => self.marks[n - 2].2,
        };
        self.bytes.len() - start
    }

    /// Whether events of enclosing levels stay held below the current one.
    pub fn held_below_current_level(&self) -> bool {
        self.marks.last().is_some_and(|&(_, events, _)| events > 0)
    }

    pub fn start_sub(&mut self, sub: u32) {
        self.marks.push((sub, self.events.len(), self.bytes.len()));
    }

    /// `RELEASE SAVEPOINT` (or the end of an exception block without error):
    /// the events stay and now belong to the parent.
    pub fn commit_sub(&mut self, sub: u32) {
        if let Some(i) = self.marks.iter().rposition(|m| m.0 == sub) {
            self.marks.truncate(i);
        }
    }

    /// `ROLLBACK TO SAVEPOINT`: forget everything the subtransaction added,
    /// including what its already-released children added.
    pub fn abort_sub(&mut self, sub: u32) {
        if let Some(i) = self.marks.iter().rposition(|m| m.0 == sub) {
            let (_, events, bytes) = self.marks[i];
            self.truncate(events, bytes);
            self.marks.truncate(i);
        }
    }

    /// Removes the current level's events after they were written
    /// elsewhere; every mark (all at or before the level's start) stays
    /// correct.
    pub fn drain_current_level(&mut self) {
        let (events, bytes) = self.marks.last().map_or((0, 0), |&(_, e, b)| (e, b));
        self.truncate(events, bytes);
    }

    /// Keeps the first `events` events and `bytes` of the arena.
    fn truncate(&mut self, events: usize, bytes: usize) {
        let gone: usize = self.events[events.min(self.events.len())..]
            .iter()
            .map(|h| h.text.as_deref().map_or(0, str::len))
            .sum();
        self.texts -= gone;
        self.events.truncate(events);
        self.bytes.truncate(bytes);
    }

    /// Forgets everything (transaction end).
    pub fn clear(&mut self) {
        self.dests.clear();
        self.bytes.clear();
        self.events.clear();
        self.texts = 0;
        self.marks.clear();
        self.next_ordinal = 0;
        // Do not keep a 64 MB arena alive for the rest of the session.
        if self.bytes.capacity() > 1 << 20 {
            self.bytes = Vec::new();
            self.events = Vec::new();
        }
    }

    /// Events in order, each with its destination and key.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &[u8], Key<'_>)> {
        self.iter_from(0).map(|(d, m, _, k)| (d, m, k))
    }

    /// The current level's events in order, each with its destination,
    /// ordinal and key.
    pub fn current_level(&self) -> impl Iterator<Item = (&K, &[u8], u64, Key<'_>)> {
        self.iter_from(self.marks.last().map_or(0, |&(_, e, _)| e))
    }

    fn iter_from(&self, first: usize) -> impl Iterator<Item = (&K, &[u8], u64, Key<'_>)> {
        let mut start = match first {
            0 => 0,
            i => self.events[i - 1].end,
        };
        self.events[first..].iter().map(move |h| {
            let msg = &self.bytes[start..h.end];
            start = h.end;
            let key = Key {
                order: h.key,
                text: h.text.as_deref(),
            };
            (&self.dests[h.dest as usize], msg, h.ordinal, key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(p: &Pending<&'static str>) -> Vec<(String, String)> {
        p.iter()
            .map(|(d, m, _)| (d.to_string(), String::from_utf8(m.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn keeps_order_and_destinations() {
        let mut p = Pending::default();
        p.push(&"a", b"1", 100).unwrap();
        p.push(&"b", b"2", 100).unwrap();
        p.push(&"a", b"3", 100).unwrap();
        assert_eq!(
            msgs(&p),
            [("a", "1"), ("b", "2"), ("a", "3")].map(|(a, b)| (a.into(), b.into()))
        );
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn savepoint_rollback_drops_only_its_tail() {
        let mut p = Pending::default();
        p.push(&"a", b"top", 100).unwrap();
        p.start_sub(2);
        p.push(&"a", b"s1", 100).unwrap();
        p.start_sub(3);
        p.push(&"a", b"s2", 100).unwrap();
        p.commit_sub(3); // RELEASE inner: its event now belongs to sub 2
        p.abort_sub(2); // ROLLBACK TO outer: both go
        p.push(&"a", b"after", 100).unwrap();
        let got: Vec<_> = msgs(&p).into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, ["top", "after"]);
    }

    #[test]
    fn released_savepoint_keeps_events() {
        let mut p = Pending::default();
        p.start_sub(2);
        p.push(&"a", b"x", 100).unwrap();
        p.commit_sub(2);
        assert_eq!(p.len(), 1);
        assert_eq!(p.current_level_bytes(), 1);
    }

    #[test]
    fn level_tracking() {
        let mut p = Pending::default();
        p.push(&"a", b"xx", 100).unwrap();
        assert_eq!(p.current_level_bytes(), 2);
        p.start_sub(2);
        assert_eq!(p.current_level_bytes(), 0);
        p.push(&"a", b"yyy", 100).unwrap();
        assert_eq!(p.current_level_bytes(), 3);
        p.abort_sub(2);
        assert_eq!(p.current_level_bytes(), 2);
    }

    #[test]
    fn enclosing_level_counts_what_a_release_would_merge() {
        let mut p = Pending::default();
        p.push(&"a", b"top", 100).unwrap();
        p.start_sub(2);
        p.push(&"a", b"12", 100).unwrap();
        assert_eq!(p.enclosing_level_bytes(), 5);
        assert!(p.held_below_current_level());
        p.start_sub(3);
        p.push(&"a", b"345", 100).unwrap();
        assert_eq!(p.enclosing_level_bytes(), 5);
        p.commit_sub(3);
        assert_eq!(p.enclosing_level_bytes(), 8);
    }

    #[test]
    fn a_level_drains_its_own_events_and_ordinals_go_on() {
        let mut p = Pending::default();
        p.push(&"a", b"outer", 100).unwrap();
        p.start_sub(2);
        p.push(&"a", b"in1", 100).unwrap();
        p.push(&"b", b"in2", 100).unwrap();
        let level: Vec<_> = p
            .current_level()
            .map(|(d, m, o, _)| (*d, m.to_vec(), o))
            .collect();
        assert_eq!(
            level,
            [("a", b"in1".to_vec(), 1), ("b", b"in2".to_vec(), 2)]
        );
        p.drain_current_level();
        p.push(&"a", b"in3", 100).unwrap();
        assert_eq!(
            p.current_level().map(|(_, _, o, _)| o).collect::<Vec<_>>(),
            [3]
        );
        p.commit_sub(2);
        let all: Vec<_> = p.iter_from(0).map(|(_, m, o, _)| (m.to_vec(), o)).collect();
        assert_eq!(all, [(b"outer".to_vec(), 0), (b"in3".to_vec(), 3)]);
    }

    #[test]
    fn keys_stay_with_their_events() {
        let mut p = Pending::default();
        let key = |order, text| Key { order, text };
        p.push_to(
            |d| *d == "a",
            || "a",
            b"1",
            key(Some(1), Some("{\"id\":1}")),
            100,
        )
        .unwrap();
        p.start_sub(2);
        p.push_to(
            |d| *d == "a",
            || "a",
            b"2",
            key(Some(2), Some("{\"id\":2}")),
            100,
        )
        .unwrap();
        p.abort_sub(2);
        p.push_to(|d| *d == "a", || "a", b"3", key(None, None), 100)
            .unwrap();
        let got: Vec<_> = p.iter().map(|(_, m, k)| (m.to_vec(), k)).collect();
        assert_eq!(
            got,
            [
                (b"1".to_vec(), key(Some(1), Some("{\"id\":1}"))),
                (b"3".to_vec(), key(None, None))
            ]
        );
        // Texts count against the limit, and leave it with their events
        // (2 bytes and 8 of text held: one more byte with 89 of text fits).
        let (fits, over) = ("k".repeat(89), "k".repeat(90));
        let push = |p: &mut Pending<&str>, t: &str| {
            let k = Key {
                order: None,
                text: Some(t),
            };
            p.push_to(|d| *d == "a", || "a", b"4", k, 100)
        };
        assert_eq!(push(&mut p, &over), Err(Full { limit: 100 }));
        assert_eq!(push(&mut p, &fits), Ok(()));
    }

    #[test]
    fn limit_is_enforced() {
        let mut p = Pending::default();
        p.push(&"a", b"12345", 8).unwrap();
        assert_eq!(p.push(&"a", b"6789", 8), Err(Full { limit: 8 }));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn drain_keeps_savepoints_working() {
        let mut p = Pending::default();
        p.start_sub(2);
        p.push(&"a", b"x", 100).unwrap();
        p.drain_current_level();
        p.push(&"a", b"y", 100).unwrap();
        p.abort_sub(2);
        assert!(p.is_empty());
    }

    #[test]
    fn clear_forgets_everything() {
        let mut p = Pending::default();
        p.start_sub(2);
        p.push(&"a", b"x", 100).unwrap();
        p.clear();
        assert!(p.is_empty() && p.current_level_bytes() == 0);
    }
}
