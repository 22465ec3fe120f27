//! Statement boundaries: coalesced sync ndjson events are written when the
//! statement that produced them ends. `ExecutorEnd` covers INSERT, UPDATE,
//! DELETE and MERGE (their AFTER triggers have fired in `ExecutorFinish`);
//! `ProcessUtility` covers COPY, which fires triggers without an executor
//! of its own, and any utility statement that runs DML inside.

use crate::delivery::sync;
use pgrx::pg_sys;
use pgrx::prelude::*;

static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: hooks are installed once per process, from _PG_init, chaining
    // whatever was installed before.
    unsafe {
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    match PREV_EXECUTOR_END {
        Some(prev) => prev(query),
        None => pg_sys::standard_ExecutorEnd(query),
    }
    flush();
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
        None => pg_sys::standard_ProcessUtility(
            pstmt,
            query,
            read_only_tree,
            context,
            params,
            env,
            dest,
            qc,
        ),
    }
    flush();
}

/// Flushes at the end of a statement, never while a transaction is being
/// aborted (portal cleanup can end executors then): the abort callback
/// discards instead.
fn flush() {
    // SAFETY: reads the transaction state.
    if unsafe { pg_sys::IsTransactionState() } {
        sync::flush_all();
    }
}
