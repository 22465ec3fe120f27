//! Functions for the DBA, in schema `emit`.

#[pgrx::pg_schema]
mod emit {
    use crate::delivery::outbox;
    use pgrx::prelude::*;

    /// Moves dead letters (all, or one destination's) back into the outbox
    /// and wakes the worker at commit. Returns the number of events.
    /// They join the end of the queue, in their original order, and get new
    /// event ids: their old ones are below what receivers have seen since,
    /// and would be dropped as duplicates.
    /// SECURITY DEFINER so that `emit_admin` needs no rights on the
    /// outbox itself; every name in it is schema-qualified.
    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn requeue_dead_letters(destination: default!(Option<&str>, "NULL")) -> i64 {
        refuse_on_standby("requeue_dead_letters");
        // A 0.2 schema (before ALTER EXTENSION UPDATE) has no keys on its
        // dead letters.
        let keys = match crate::privileged::schema() {
            crate::privileged::Schema::Current => ", keys, record_keys",
            _ => "",
        };
        let n = Spi::get_one_with_args::<i64>(
            &format!(
                "WITH moved AS (
                 DELETE FROM emit.dead_letter
                  WHERE $1::text IS NULL OR destination = $1
                 RETURNING *
             ), queued AS (
                 INSERT INTO emit.outbox
                     (destination, host, port, framing, url, headers, events, payload, tx_seq,
                      format{keys})
                 SELECT destination, host, port, framing, url, headers, events, payload,
                        pg_catalog.nextval('emit.tx_seq'::pg_catalog.regclass), format{keys}
                   FROM (SELECT * FROM moved ORDER BY id) m
                 RETURNING events
             )
             SELECT coalesce(pg_catalog.sum(events), 0)::pg_catalog.int8 FROM queued"
            ),
            &[destination.into()],
        )
        .unwrap_or_else(|e| error!("pg_emit: re-queueing dead letters failed: {e}"))
        .unwrap_or(0);
        if n > 0 {
            outbox::note_written();
        }
        n
    }

    /// Deletes dead letters for good: all, one destination's, and/or those
    /// whose `id` is in `ids`. Returns the number of events.
    /// `emit_admin` gets this function instead of DELETE on
    /// `emit.dead_letter`: the right to delete rows is also the right to
    /// `LOCK TABLE` in ACCESS EXCLUSIVE mode, and the worker, which writes
    /// dead letters, then waited for the admin's transaction with all
    /// delivery stalled.
    #[pg_extern(volatile, parallel_unsafe, security_definer)]
    #[search_path(pg_catalog, pg_temp)]
    fn discard_dead_letters(
        destination: default!(Option<&str>, "NULL"),
        ids: default!(Option<Vec<i64>>, "NULL"),
    ) -> i64 {
        refuse_on_standby("discard_dead_letters");
        Spi::get_one_with_args::<i64>(
            "WITH gone AS (
                 DELETE FROM emit.dead_letter
                  WHERE ($1::text IS NULL OR destination = $1)
                    AND ($2::pg_catalog.int8[] IS NULL OR id = ANY ($2))
                 RETURNING events
             )
             SELECT coalesce(pg_catalog.sum(events), 0)::pg_catalog.int8 FROM gone",
            &[destination.into(), ids.into()],
        )
        .unwrap_or_else(|e| error!("pg_emit: discarding dead letters failed: {e}"))
        .unwrap_or(0)
    }

    fn refuse_on_standby(func: &str) {
        // SAFETY: reads shared recovery state.
        if unsafe { pgrx::pg_sys::RecoveryInProgress() } {
            pgrx::pg_sys::panic::ErrorReport::new(
                pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!(
                    "emit.{func}: dead letters cannot change on a standby; run it on the primary"
                ),
                "pg_emit",
            )
            .report(pgrx::PgLogLevel::ERROR);
        }
    }
}
