//! Events that sync and commit delivery failed to deliver, counted per
//! database for `emit.metrics()`. The sessions that send have nowhere
//! else to count them: a table write would be rolled back with a failed
//! statement, and a commit callback may not write at all. So they live in
//! shared memory, which only a preloaded library can ask for; without
//! `shared_preload_libraries = 'pg_emit'` nothing is counted (the WARNINGs
//! remain) and `emit.metrics()` leaves the two counters out.

use pg_emit_core::metrics::Immediate;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Databases counted; past that many, a new database's failures go
/// uncounted (its WARNINGs still say everything).
const DATABASES: usize = 1024;

struct Slot {
    /// The database's OID; 0 while the slot is free.
    database: AtomicU32,
    sync: AtomicU64,
    commit: AtomicU64,
}

pub struct Counters([Slot; DATABASES]);

impl Default for Counters {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| Slot {
            database: AtomicU32::new(0),
            sync: AtomicU64::new(0),
            commit: AtomicU64::new(0),
        }))
    }
}

// SAFETY: atomics only, no pointers: the same in every process.
unsafe impl PGRXSharedMemory for Counters {}

// SAFETY: no other shared memory of this name.
static COUNTERS: PgAtomic<Counters> = unsafe { PgAtomic::new(c"pg_emit failed events") };

/// Whether the postmaster loaded pg_emit before forking this process, and
/// so made [`COUNTERS`].
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Asks for the counters' memory: from `_PG_init` while preloading.
// pgrx's macro tests this crate's features for PostgreSQL 13, which it
// does not have.
#[allow(unexpected_cfgs)]
pub fn init() {
    pg_shmem_init!(COUNTERS);
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Which delivery failed.
#[derive(Clone, Copy)]
pub enum Mode {
    Sync,
    Commit,
}

/// Counts `events` that `mode` did not deliver in this database.
pub fn count(mode: Mode, events: u64) {
    if let Some(slot) = slot(true) {
        match mode {
            Mode::Sync => &slot.sync,
            Mode::Commit => &slot.commit,
        }
        .fetch_add(events, Ordering::Relaxed);
    }
}

/// This database's counts, if they are kept.
pub fn current() -> Option<Immediate> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    Some(match slot(false) {
        Some(s) => Immediate {
            sync_failed: s.sync.load(Ordering::Relaxed),
            commit_failed: s.commit.load(Ordering::Relaxed),
        },
        None => Immediate::default(),
    })
}

/// This database's slot; a free one is taken for it if `claim`.
fn slot(claim: bool) -> Option<&'static Slot> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: a backend's database is set before any trigger or function runs.
    let me = unsafe { pg_sys::MyDatabaseId }.to_u32();
    for s in &COUNTERS.get().0 {
        match s.database.load(Ordering::Acquire) {
            d if d == me => return Some(s),
            0 if claim => {
                match s
                    .database
                    .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Some(s),
                    Err(d) if d == me => return Some(s),
                    Err(_) => continue,
                }
            }
            0 => return None,
            _ => continue,
        }
    }
    None
}
