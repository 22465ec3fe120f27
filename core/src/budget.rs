//! How many connections to receivers the worker holds at once. Every
//! destination's requests in flight are sockets, and a process has a limit
//! of open files (1,024 by default for PostgreSQL's processes): fifty
//! receivers that accept and never answer, at 32 requests each, would take
//! every descriptor and leave a healthy destination none. The worker
//! raises its soft limit to the hard one, keeps a share of that for
//! PostgreSQL's own files and the live listener, and splits the rest
//! between the destinations it is serving.

/// Descriptors left to PostgreSQL's own files (its file cache, WAL,
/// sockets) before the worker's share is counted.
const RESERVED: u64 = 256;

/// Connections the worker holds at once at most, however high the limit:
/// each is a thread today.
const MOST: usize = 4096;

/// The worker's connections to receivers, from its open-file limit: half
/// of what PostgreSQL leaves, the other half for the live listener's
/// subscribers and the unforeseen.
pub fn connections(open_files: u64) -> usize {
    (open_files.saturating_sub(RESERVED) / 2).clamp(16, MOST as u64) as usize
}

/// Requests in flight one destination may have when `busy` destinations
/// share `budget` connections (each has at least one).
pub fn share(budget: usize, busy: usize) -> usize {
    (budget / busy.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_file_limit() {
        assert_eq!(connections(1024), 384);
        assert_eq!(connections(100), 16);
        assert_eq!(connections(1 << 20), MOST);
        // Fifty hanging destinations and a healthy one at 1,024 files:
        // seven requests each, 357 sockets, far from the limit.
        assert_eq!(share(connections(1024), 51), 7);
        assert_eq!(share(10, 100), 1);
    }
}
