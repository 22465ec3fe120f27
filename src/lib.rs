//! pg_emit: send row changes and messages out of PostgreSQL over TCP.
//!
//! Pure logic (`options`, `event`, `cooldown`, `transport`) has no pgrx
//! dependency and is unit-tested with plain `cargo test`; the modules that
//! touch the backend (`settings`, `error`, `interrupts`, `delivery`,
//! `trigger`) are thin glue around it.

use pgrx::prelude::*;

pub mod cooldown;
pub mod delivery;
pub mod error;
pub mod event;
pub mod interrupts;
pub mod options;
pub mod send;
pub mod settings;
pub mod transport;
pub mod trigger;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/triggers.sql", name = "triggers");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
}

#[cfg(feature = "pg_test")]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn send_socket_is_strict() {
        let r = Spi::get_one::<i32>("SELECT send_socket(NULL, '127.0.0.1', 1)").unwrap();
        assert_eq!(r, None);
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
