//! Who is subscribed to what, and each subscriber's queue of events.
//!
//! Each event is in memory once, however many subscribers get it: the
//! worker's main thread makes it once per publish (or replay page), every
//! subscriber of its channel gets a reference to it, and connections
//! write their framing around the shared payload with vectored writes
//! ([`Event::sse`], [`Event::ws`]) instead of copying it into a buffer of
//! their own. Replay pages that several subscribers read at once share
//! their events too ([`Hub::recent`]). A subscriber's queue is bounded:
//! one that falls too far behind is closed with a reason that says where
//! to resume, instead of making the worker hold its backlog.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

/// One channel event: its payload, once, and the little each protocol
/// puts around it.
pub struct Event {
    pub id: i64,
    payload: Box<str>,
    /// `id: N` and the first `data: `.
    sse_head: Box<str>,
    /// The WebSocket frame header (a server's: unmasked, one text frame)
    /// and `{"id":N,"data":`.
    ws_head: Box<[u8]>,
    /// The payload as a JSON string, when it is not JSON itself.
    quoted: Option<Box<str>>,
}

impl Event {
    /// `payload` is the event as its destination's format made it (JSON,
    /// which async events always are, or text, sent as a JSON string over
    /// WebSocket).
    pub fn new(id: i64, payload: &str) -> Event {
        let json = serde_json::from_str::<&serde_json::value::RawValue>(payload).is_ok();
        let quoted: Option<Box<str>> = (!json).then(|| {
            serde_json::to_string(payload)
                .expect("a string serializes")
                .into()
        });
        let prefix = format!("{{\"id\":{id},\"data\":");
        let data = quoted.as_deref().unwrap_or(payload);
        let len = prefix.len() + data.len() + 1;
        let mut ws_head = vec![0x81]; // FIN, text
        match len {
            0..=125 => ws_head.push(len as u8),
            126..=0xffff => {
                ws_head.push(126);
                ws_head.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                ws_head.push(127);
                ws_head.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        ws_head.extend_from_slice(prefix.as_bytes());
        Event {
            id,
            payload: payload.into(),
            sse_head: format!("id: {id}\ndata: ").into(),
            ws_head: ws_head.into(),
            quoted,
        }
    }

    /// Bytes of the event, for the subscribers' bounds.
    pub fn size(&self) -> usize {
        self.payload.len() + self.quoted.as_ref().map_or(0, |q| q.len())
    }

    /// The Server-Sent Events framing: `id: N`, one `data:` field per
    /// line of the payload (the reader joins them back with newlines), a
    /// blank line. Appended to `out` as slices of the event.
    pub fn sse<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        out.push(IoSlice::new(self.sse_head.as_bytes()));
        for (i, line) in self.payload.split('\n').enumerate() {
            if i > 0 {
                out.push(IoSlice::new(b"\ndata: "));
            }
            out.push(IoSlice::new(line.trim_end_matches('\r').as_bytes()));
        }
        out.push(IoSlice::new(b"\n\n"));
    }

    /// One WebSocket text frame carrying `{"id":N,"data":<payload>}`,
    /// appended to `out` as slices of the event.
    pub fn ws<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        let data = self.quoted.as_deref().unwrap_or(&self.payload);
        out.push(IoSlice::new(&self.ws_head));
        out.push(IoSlice::new(data.as_bytes()));
        out.push(IoSlice::new(b"}"));
    }
}

/// Writes every byte of `slices` (vectored, so shared events are never
/// copied into a buffer of the connection's own).
pub fn write_slices(
    w: &mut impl std::io::Write,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Why the listener closed a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Close {
    /// Its queue passed the bound: it reads more slowly than events come.
    Lagging,
    /// Its token was revoked, or expired.
    TokenGone,
    /// The listener is stopping (the worker restarts, or was told to
    /// listen elsewhere).
    Stopping,
    /// Its replay could not be read.
    Failed(String),
}

impl Close {
    /// What the subscriber is told; `resume` is the last id it was sent.
    pub fn reason(&self, resume: i64) -> String {
        match self {
            Close::Lagging => {
                format!("too far behind; reconnect with last_event_id={resume}")
            }
            Close::TokenGone => "token revoked or expired".into(),
            Close::Stopping => {
                format!("listener stopping; reconnect with last_event_id={resume}")
            }
            Close::Failed(why) => format!("{why}; reconnect with last_event_id={resume}"),
        }
    }
}

/// How far a subscriber may fall behind before it is closed.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub events: usize,
    pub bytes: usize,
}

/// A subscriber's side of the hub: its queue, and the eventfd its
/// connection thread waits on (with its socket) to learn of new events.
pub struct Sub {
    pub id: u64,
    pub channel: String,
    pub token: [u8; 32],
    queue: Mutex<Queue>,
    wake: OwnedFd,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    closed: Option<Close>,
}

impl Sub {
    /// Takes what is queued, and the reason to close once it is written.
    pub fn take(&self) -> (Vec<Arc<Event>>, Option<Close>) {
        let mut buf = [0u8; 8];
        // SAFETY: reading an eventfd we own resets its counter; it is
        // non-blocking, so an empty one returns EAGAIN at once.
        unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        let mut q = self.queue.lock().expect("hub lock");
        q.bytes = 0;
        (q.events.drain(..).collect(), q.closed.clone())
    }

    /// The descriptor that becomes readable when there is something to take.
    pub fn wake_fd(&self) -> i32 {
        self.wake.as_raw_fd()
    }

    /// Queues `events` under one lock and wakes the thread once. An
    /// event is always taken into an empty queue, however large it is.
    /// True when this closed the subscription for lagging.
    fn push(&self, events: &[Arc<Event>], bounds: Bounds) -> bool {
        let mut q = self.queue.lock().expect("hub lock");
        if q.closed.is_some() {
            return false;
        }
        let mut lagging = false;
        for e in events {
            let full = q.events.len() >= bounds.events || q.bytes + e.size() > bounds.bytes;
            if full && !q.events.is_empty() {
                q.events.clear();
                q.closed = Some(Close::Lagging);
                lagging = true;
                break;
            }
            q.bytes += e.size();
            q.events.push_back(e.clone());
        }
        drop(q);
        self.notify();
        lagging
    }

    /// Whether the hub has closed it (its connection stops replaying).
    pub fn is_closed(&self) -> bool {
        self.queue.lock().expect("hub lock").closed.is_some()
    }

    fn close(&self, why: Close) {
        let mut q = self.queue.lock().expect("hub lock");
        if q.closed.is_none() {
            q.closed = Some(why);
        }
        drop(q);
        self.notify();
    }

    fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to an eventfd we own; it cannot block
        // (non-blocking, and the counter cannot overflow in practice).
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Every open subscription, by channel.
pub struct Hub {
    bounds: Bounds,
    inner: Mutex<Inner>,
    recent: Mutex<Recent>,
    /// Subscriptions closed for lagging.
    dropped: std::sync::atomic::AtomicU64,
}

/// Events some subscriber holds, by channel and id, held weakly: a
/// replay page that several subscribers read at once is in memory once.
/// The last [`KEEP_BYTES`] remembered are also held strongly, so that
/// subscribers replaying the same history a little apart share what the
/// first of them read instead of each reading it from the database.
#[derive(Default)]
struct Recent {
    by_channel: HashMap<String, BTreeMap<i64, Weak<Event>>>,
    entries: usize,
    /// `entries` after the last sweep of dead ones.
    swept: usize,
    kept: VecDeque<Arc<Event>>,
    kept_bytes: usize,
}

/// Bytes of recently remembered events held strongly (see [`Recent`]).
const KEEP_BYTES: usize = 32 << 20;

#[derive(Default)]
struct Inner {
    next_id: u64,
    by_channel: HashMap<String, Vec<Arc<Sub>>>,
}

impl Hub {
    pub fn new(bounds: Bounds) -> Hub {
        Hub {
            bounds,
            inner: Mutex::default(),
            recent: Mutex::default(),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Subscriptions closed so far because they fell too far behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Remembers `events` of `channel` (see [`Recent`]).
    pub fn remember(&self, channel: &str, events: &[Arc<Event>]) {
        let mut r = self.recent.lock().expect("hub lock");
        let map = r.by_channel.entry(channel.to_string()).or_default();
        let before = map.len();
        for e in events {
            map.insert(e.id, Arc::downgrade(e));
        }
        let added = map.len() - before;
        r.entries += added;
        for e in events {
            r.kept_bytes += e.size();
            r.kept.push_back(e.clone());
        }
        while r.kept_bytes > KEEP_BYTES && r.kept.len() > 1 {
            let old = r.kept.pop_front().expect("more than one");
            r.kept_bytes -= old.size();
        }
        // Dead entries go once there are twice as many as after the last
        // sweep: a sweep's cost is spread over as many inserts.
        if r.entries > 2 * r.swept.max(1024) {
            r.by_channel.retain(|_, m| {
                m.retain(|_, e| e.strong_count() > 0);
                !m.is_empty()
            });
            r.entries = r.by_channel.values().map(BTreeMap::len).sum();
            r.swept = r.entries;
        }
    }

    /// A replay page from memory: events of `channel` with ids from
    /// `after + 1` on, consecutive and at most `upto`, at most `events` of
    /// them and, past the first, `bytes`; `None` unless event `after + 1`
    /// is in memory.
    pub fn recent(
        &self,
        channel: &str,
        after: i64,
        upto: i64,
        events: usize,
        bytes: usize,
    ) -> Option<Vec<Arc<Event>>> {
        let r = self.recent.lock().expect("hub lock");
        let map = r.by_channel.get(channel)?;
        let (mut out, mut size) = (Vec::new(), 0);
        for (&id, e) in map.range(after + 1..=upto) {
            let Some(e) = e.upgrade() else { break };
            if id != after + 1 + out.len() as i64
                || out.len() == events
                || (!out.is_empty() && size + e.size() > bytes)
            {
                break;
            }
            size += e.size();
            out.push(e);
        }
        (!out.is_empty()).then_some(out)
    }

    /// Adds a subscriber. Called by the main thread, between two
    /// publishes, so the subscriber gets exactly the events published
    /// after the head it was told.
    pub fn subscribe(&self, channel: &str, token: [u8; 32]) -> std::io::Result<Arc<Sub>> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is ours and open.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut inner = self.inner.lock().expect("hub lock");
        inner.next_id += 1;
        let sub = Arc::new(Sub {
            id: inner.next_id,
            channel: channel.to_string(),
            token,
            queue: Mutex::default(),
            wake,
        });
        inner
            .by_channel
            .entry(channel.to_string())
            .or_default()
            .push(sub.clone());
        Ok(sub)
    }

    pub fn unsubscribe(&self, sub: &Sub) {
        let mut inner = self.inner.lock().expect("hub lock");
        if let Some(subs) = inner.by_channel.get_mut(&sub.channel) {
            subs.retain(|s| s.id != sub.id);
            if subs.is_empty() {
                inner.by_channel.remove(&sub.channel);
            }
        }
    }

    /// Hands `events` (in id order) to every subscriber of `channel`.
    pub fn publish(&self, channel: &str, events: &[Arc<Event>]) {
        self.remember(channel, events);
        let inner = self.inner.lock().expect("hub lock");
        for sub in inner.by_channel.get(channel).into_iter().flatten() {
            if sub.push(events, self.bounds) {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The tokens (hashes) of every open subscription.
    pub fn tokens(&self) -> Vec<[u8; 32]> {
        let inner = self.inner.lock().expect("hub lock");
        let mut t: Vec<[u8; 32]> = inner
            .by_channel
            .values()
            .flatten()
            .map(|s| s.token)
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// Closes every subscription opened with one of `tokens`.
    pub fn close_tokens(&self, tokens: &[[u8; 32]]) {
        let inner = self.inner.lock().expect("hub lock");
        for sub in inner.by_channel.values().flatten() {
            if tokens.contains(&sub.token) {
                sub.close(Close::TokenGone);
            }
        }
    }

    pub fn close_all(&self) {
        let inner = self.inner.lock().expect("hub lock");
        for sub in inner.by_channel.values().flatten() {
            sub.close(Close::Stopping);
        }
    }

    pub fn subscribers(&self) -> usize {
        let inner = self.inner.lock().expect("hub lock");
        inner.by_channel.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(ids: std::ops::Range<i64>) -> Vec<Arc<Event>> {
        ids.map(|i| Arc::new(Event::new(i, "{\"a\":1}"))).collect()
    }

    fn sse(e: &Event) -> Vec<u8> {
        let mut s = Vec::new();
        e.sse(&mut s);
        s.iter().flat_map(|x| x.to_vec()).collect()
    }

    /// The frame's payload, after checking its header.
    fn ws(e: &Event) -> String {
        let mut s = Vec::new();
        e.ws(&mut s);
        let frame: Vec<u8> = s.iter().flat_map(|x| x.to_vec()).collect();
        let (len, at) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(frame[0], 0x81);
        assert_eq!(frame.len(), at + len);
        String::from_utf8(frame[at..].to_vec()).unwrap()
    }

    #[test]
    fn framing() {
        let e = Event::new(7, "{\"a\":\"x\"}");
        assert_eq!(sse(&e), b"id: 7\ndata: {\"a\":\"x\"}\n\n");
        assert_eq!(ws(&e), "{\"id\":7,\"data\":{\"a\":\"x\"}}");
        let e = Event::new(8, "two\r\nlines");
        assert_eq!(sse(&e), b"id: 8\ndata: two\ndata: lines\n\n");
        assert_eq!(ws(&e), "{\"id\":8,\"data\":\"two\\r\\nlines\"}");
        for n in [100, 1000, 70_000] {
            let big = format!("{{\"p\":\"{}\"}}", "x".repeat(n));
            assert_eq!(
                ws(&Event::new(9, &big)),
                format!("{{\"id\":9,\"data\":{big}}}")
            );
        }
    }

    #[test]
    fn replayers_share_what_some_subscriber_holds() {
        let hub = Hub::new(Bounds {
            events: 5,
            bytes: 1 << 20,
        });
        let held = events(1..6);
        hub.remember("c", &held);
        let page = hub.recent("c", 0, 5, 3, 1 << 20).unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            Arc::ptr_eq(&page[0], &held[0]),
            "the same event, not a copy"
        );
        assert!(hub.recent("c", 3, 4, 10, 1 << 20).unwrap().len() == 1);
        assert!(hub.recent("c", 5, 9, 10, 1 << 20).is_none());
        assert!(hub.recent("d", 0, 5, 10, 1 << 20).is_none());
        // Past the first, a page stops at its bytes.
        assert_eq!(hub.recent("c", 0, 5, 10, 1).unwrap().len(), 1);
        // Once nobody holds them and they are no longer among the last
        // KEEP_BYTES, they are gone (and swept in time).
        drop((held, page));
        assert!(hub.recent("c", 0, 5, 10, 1 << 20).is_some(), "kept");
        let big = format!("{{\"p\":\"{}\"}}", "x".repeat(KEEP_BYTES / 2));
        let bigs: Vec<Arc<Event>> = (100..103).map(|i| Arc::new(Event::new(i, &big))).collect();
        hub.remember("c", &bigs);
        drop(bigs);
        assert!(hub.recent("c", 0, 5, 10, 1 << 20).is_none());
        assert!(hub.recent.lock().unwrap().kept_bytes <= KEEP_BYTES);
        // Entries of events nobody holds are swept: what stays is about
        // what is kept.
        let mid = format!("{{\"p\":\"{}\"}}", "x".repeat(64 << 10));
        for k in 0..3000 {
            hub.remember("c", &[Arc::new(Event::new(200 + k, &mid))]);
        }
        let r = hub.recent.lock().unwrap();
        assert!(
            r.entries <= r.kept.len() + 2048,
            "{} {}",
            r.entries,
            r.kept.len()
        );
    }

    #[test]
    fn subscribers_share_events_and_laggards_are_closed() {
        let hub = Hub::new(Bounds {
            events: 5,
            bytes: 1 << 20,
        });
        let a = hub.subscribe("c", [1; 32]).unwrap();
        let b = hub.subscribe("c", [2; 32]).unwrap();
        let other = hub.subscribe("d", [1; 32]).unwrap();
        hub.publish("c", &events(1..4));
        let (got, closed) = a.take();
        assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(closed.is_none());
        assert!(other.take().0.is_empty());
        // One event past the byte bound still goes into an empty queue.
        let small = Hub::new(Bounds {
            events: 5,
            bytes: 4,
        });
        let idle = small.subscribe("c", [3; 32]).unwrap();
        small.publish("c", &events(1..2));
        let (got, closed) = idle.take();
        assert_eq!((got.len(), closed), (1, None));
        // b never read: three more pass its bound of five.
        hub.publish("c", &events(4..7));
        let (got, closed) = b.take();
        assert!(got.is_empty());
        assert_eq!(closed, Some(Close::Lagging));
        assert_eq!(hub.dropped(), 1);
        assert_eq!(a.take().0.len(), 3);
        hub.close_tokens(&[[1; 32]]);
        assert_eq!(a.take().1, Some(Close::TokenGone));
        assert_eq!(other.take().1, Some(Close::TokenGone));
        assert_eq!(hub.tokens().len(), 2);
        hub.unsubscribe(&a);
        hub.unsubscribe(&b);
        assert_eq!(hub.subscribers(), 1);
    }
}
