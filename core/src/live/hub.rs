//! Who is subscribed to what, and each subscriber's queue of events.
//!
//! The worker's main thread publishes each event once; every subscriber
//! of its channel gets a reference to the same bytes (framed once for SSE
//! and once for WebSocket), so a hundred subscribers cost a hundred
//! pointers per event, not a hundred copies. A subscriber's queue is
//! bounded: one that falls too far behind is closed with a reason that
//! says where to resume, instead of making the worker hold its backlog.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// One channel event, framed for both protocols.
pub struct Event {
    pub id: i64,
    /// `id: N` and the payload's `data:` lines, ending with a blank line.
    pub sse: Vec<u8>,
    /// `{"id":N,"data":<payload>}`.
    pub ws: tungstenite::Utf8Bytes,
}

impl Event {
    /// `payload` is the event as its destination's format made it: one
    /// JSON object (async events always are).
    pub fn new(id: i64, payload: &str) -> Event {
        let mut sse = format!("id: {id}\n").into_bytes();
        // A payload of several lines is several data fields, which the
        // reader joins back with newlines.
        for line in payload.split('\n') {
            sse.extend_from_slice(b"data: ");
            sse.extend_from_slice(line.trim_end_matches('\r').as_bytes());
            sse.push(b'\n');
        }
        sse.push(b'\n');
        let json = serde_json::from_str::<&serde_json::value::RawValue>(payload).is_ok();
        let ws = if json {
            format!("{{\"id\":{id},\"data\":{payload}}}")
        } else {
            let quoted = serde_json::to_string(payload).expect("a string serializes");
            format!("{{\"id\":{id},\"data\":{quoted}}}")
        };
        Event {
            id,
            sse,
            ws: ws.into(),
        }
    }
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
    fn push(&self, events: &[Arc<Event>], bounds: Bounds) {
        let mut q = self.queue.lock().expect("hub lock");
        if q.closed.is_some() {
            return;
        }
        for e in events {
            let full = q.events.len() >= bounds.events || q.bytes + e.sse.len() > bounds.bytes;
            if full && !q.events.is_empty() {
                q.events.clear();
                q.closed = Some(Close::Lagging);
                break;
            }
            q.bytes += e.sse.len();
            q.events.push_back(e.clone());
        }
        drop(q);
        self.notify();
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
}

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
        }
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
        let inner = self.inner.lock().expect("hub lock");
        for sub in inner.by_channel.get(channel).into_iter().flatten() {
            sub.push(events, self.bounds);
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

    #[test]
    fn framing() {
        let e = Event::new(7, "{\"a\":\"x\"}");
        assert_eq!(e.sse, b"id: 7\ndata: {\"a\":\"x\"}\n\n");
        assert_eq!(e.ws.as_str(), "{\"id\":7,\"data\":{\"a\":\"x\"}}");
        let e = Event::new(8, "two\nlines");
        assert_eq!(e.sse, b"id: 8\ndata: two\ndata: lines\n\n");
        assert_eq!(e.ws.as_str(), "{\"id\":8,\"data\":\"two\\nlines\"}");
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
