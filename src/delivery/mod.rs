//! When and how an event leaves the database. Only `sync` exists so far:
//! the message is sent inside the statement that produced it.

pub mod sync;
