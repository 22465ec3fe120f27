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

// PostgreSQL's own entry points, declared here without pgrx's FFI guard.
// The guard turns an ERROR into a Rust panic and raises it again on the
// way out, which keeps only message, detail and hint: CONTEXT, schema,
// table and constraint names were lost, and with RUST_BACKTRACE set a Rust
// backtrace landed in DETAIL. Called directly, an ERROR longjmps straight
// through the hooks below, exactly as through a C hook; they hold nothing
// that needs dropping while they call these.
unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorEnd"]
    fn standard_executor_end(query: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

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

/// Not `#[pg_guard]`ed on purpose (see above): errors of the statement pass
/// through untouched. Our own work happens in [`statement_end`], which is.
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    match PREV_EXECUTOR_END {
        Some(prev) => prev(query),
        None => standard_executor_end(query),
    }
    statement_end();
}

/// Not `#[pg_guard]`ed on purpose, like [`executor_end`].
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
    let commit_prepared = is_commit_prepared(pstmt);
    let creates = creates_pg_emit(pstmt);
    let drops = drops_pg_emit(pstmt);
    if drops {
        dropping_pg_emit();
    }
    match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
        None => {
            standard_process_utility(pstmt, query, read_only_tree, context, params, env, dest, qc)
        }
    }
    if commit_prepared {
        prepared_committed();
    }
    if creates {
        crate::worker::wake::start_at_commit();
    }
    if drops {
        dropped_pg_emit();
    }
    statement_end();
}

/// Whether `pstmt` is `CREATE EXTENSION pg_emit`.
///
/// # Safety
/// `pstmt` must be the statement the utility hook was given.
unsafe fn creates_pg_emit(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    let stmt = (*pstmt).utilityStmt;
    !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_CreateExtensionStmt && {
        let name = (*(stmt as *mut pg_sys::CreateExtensionStmt)).extname;
        !name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == b"pg_emit"
    }
}

/// # Safety
/// `pstmt` must be the statement the utility hook was given.
unsafe fn is_commit_prepared(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    let stmt = (*pstmt).utilityStmt;
    !stmt.is_null()
        && (*stmt).type_ == pg_sys::NodeTag::T_TransactionStmt
        && (*(stmt as *mut pg_sys::TransactionStmt)).kind
            == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
}

/// Whether `pstmt` is `DROP EXTENSION ... pg_emit ...`.
///
/// # Safety
/// `pstmt` must be the statement the utility hook was given.
unsafe fn drops_pg_emit(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    let stmt = (*pstmt).utilityStmt;
    if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
        return false;
    }
    let drop = &*(stmt as *mut pg_sys::DropStmt);
    if drop.removeType != pg_sys::ObjectType::OBJECT_EXTENSION || drop.objects.is_null() {
        return false;
    }
    let list = &*drop.objects;
    (0..list.length as usize).any(|i| {
        let node = (*list.elements.add(i)).ptr_value as *mut pg_sys::Node;
        !node.is_null()
            && (*node).type_ == pg_sys::NodeTag::T_String
            && std::ffi::CStr::from_ptr(string_node_value(node)).to_bytes() == b"pg_emit"
    })
}

/// The text of a T_String node: its own struct from PostgreSQL 15 on, a
/// `Value` union before.
#[cfg(not(feature = "pg14"))]
unsafe fn string_node_value(node: *mut pg_sys::Node) -> *const std::ffi::c_char {
    (*(node as *mut pg_sys::String)).sval
}

#[cfg(feature = "pg14")]
unsafe fn string_node_value(node: *mut pg_sys::Node) -> *const std::ffi::c_char {
    (*(node as *mut pg_sys::Value)).val.str_
}

#[pg_guard]
extern "C-unwind" fn dropping_pg_emit() {
    crate::delivery::outbox::warn_before_drop();
}

/// Its capture slots go with it (see [`crate::capture::drop_all_slots`]).
#[pg_guard]
extern "C-unwind" fn dropped_pg_emit() {
    crate::capture::drop_all_slots();
}

#[pg_guard]
extern "C-unwind" fn prepared_committed() {
    crate::worker::wake::after_commit_prepared();
}

/// Flushes at the end of a statement, never while a transaction is being
/// aborted (portal cleanup can end executors then): the abort callback
/// discards instead.
#[pg_guard]
extern "C-unwind" fn statement_end() {
    // SAFETY: reads the transaction state.
    if unsafe { pg_sys::IsTransactionState() } {
        sync::flush_all();
    }
}
