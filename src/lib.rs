//! pg_emit: send row changes, DDL events and messages out of PostgreSQL:
//! over TCP and HTTP, into Redis Streams, NATS JetStream and Kafka, and live
//! to subscribers of channels.
//!
//! Everything that needs no backend lives in the `pg_emit_core` crate
//! (destinations, options, envelope, transports, allowlist, retry policy),
//! unit-tested without PostgreSQL; this crate is the glue around it:
//! settings, errors as SQLSTATEs, hooks, triggers, SQL functions, the
//! delivery modes' transaction handling and the worker's main loop.

use pgrx::prelude::*;

use pg_emit_core::{backoff, cooldown, event, options, security, transport};

mod admin;
mod backfill;
mod batches;
mod capture;
mod ddl;
mod delivery;
mod encoding;
mod error;
mod failures;
mod hooks;
mod interrupts;
mod made;
mod metrics;
mod plans;
mod privileged;
mod send;
mod settings;
mod shape;
mod stored;
mod trigger;
mod worker;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/triggers.sql", name = "triggers");
pgrx::extension_sql_file!("../sql/send_http.sql", name = "send_http");
pgrx::extension_sql_file!(
    "../sql/outbox.sql",
    name = "outbox",
    requires = ["bootstrap"]
);
pgrx::extension_sql_file!("../sql/ddl.sql", name = "ddl", requires = ["outbox"]);
pgrx::extension_sql_file!(
    "../sql/channels.sql",
    name = "channels",
    requires = ["outbox"]
);
pgrx::extension_sql_file!(
    "../sql/capture.sql",
    name = "capture",
    requires = ["outbox"]
);
pgrx::extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
    delivery::init();
    hooks::init();
    trigger::init();
    stored::init();
    // SAFETY: reading a flag PostgreSQL sets while preloading libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        failures::init();
        worker::launcher::register();
    }
}

/// In-backend tests. They run inside a transaction that is rolled back,
/// which is fine for sync delivery: the message leaves during the
/// statement. Commit-time behaviour is tested against a live cluster in
/// `tests/`.
#[cfg(feature = "pg_test")]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn refused_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[pg_test]
    fn send_socket_is_strict() {
        let r = Spi::get_one::<i32>("SELECT send_socket(NULL, '127.0.0.1', 1)").unwrap();
        assert_eq!(r, None);
    }

    #[pg_test]
    fn send_socket_reports_refused_as_zero() {
        let q = format!("SELECT send_socket('x', '127.0.0.1', {})", refused_port());
        assert_eq!(Spi::get_one::<i32>(&q).unwrap(), Some(0));
    }

    #[pg_test(error = "send_socket: port \"70000\" is not an integer between 1 and 65535")]
    fn send_socket_rejects_bad_port() {
        Spi::run("SELECT send_socket('x', '127.0.0.1', 70000)").unwrap();
    }

    #[pg_test]
    fn trigger_sends_the_row_as_json() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reader = std::thread::spawn(move || {
            let mut got = String::new();
            l.accept().unwrap().0.read_to_string(&mut got).unwrap();
            got
        });
        Spi::run("CREATE TABLE pgt_orders (id int, total numeric(6,2), tags text[])").unwrap();
        Spi::run(&format!(
            "CREATE TRIGGER out AFTER INSERT ON pgt_orders FOR EACH ROW \
             EXECUTE FUNCTION row_to_socket('127.0.0.1', {port})"
        ))
        .unwrap();
        Spi::run("INSERT INTO pgt_orders VALUES (1, 9.50, ARRAY['a','b'])").unwrap();
        assert_eq!(
            reader.join().unwrap(),
            r#"{"op":"INSERT","schema":"public","table":"pgt_orders","new":{"id":1,"total":9.50,"tags":["a","b"]},"old":null}"#
        );
    }

    #[pg_test]
    fn before_delete_trigger_does_not_cancel_the_delete() {
        Spi::run("SET pg_emit.failure_cooldown = 0").unwrap();
        Spi::run("CREATE TABLE pgt_keep (id int)").unwrap();
        Spi::run("INSERT INTO pgt_keep VALUES (1), (2)").unwrap();
        Spi::run(&format!(
            "CREATE TRIGGER out BEFORE UPDATE OR DELETE ON pgt_keep FOR EACH ROW \
             EXECUTE FUNCTION row_to_socket('127.0.0.1', {})",
            refused_port()
        ))
        .unwrap();
        Spi::run("UPDATE pgt_keep SET id = id + 10").unwrap();
        Spi::run("DELETE FROM pgt_keep WHERE id = 11").unwrap();
        let left = Spi::get_one::<i32>("SELECT sum(id)::int FROM pgt_keep").unwrap();
        assert_eq!(left, Some(12));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
