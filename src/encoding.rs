//! JSON is UTF-8; PostgreSQL hands out text in the database encoding.
//!
//! In a UTF-8 database (the usual case) nothing here costs anything. In
//! any other encoding, names and `row_to_json` output are converted with
//! PostgreSQL's own conversion, so a LATIN1 `é` reaches the receiver as
//! UTF-8 `é`. `SQL_ASCII` has no encoding to convert from: its bytes pass
//! when they happen to be UTF-8, and are refused (never sent broken)
//! otherwise.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::borrow::Cow;
use std::ffi::CStr;

fn database_encoding() -> i32 {
    // SAFETY: reads a backend global set at connection.
    unsafe { pg_sys::GetDatabaseEncoding() }
}

/// Whether text from this database is UTF-8 already.
pub fn database_is_utf8() -> bool {
    database_encoding() == pg_sys::pg_enc::PG_UTF8 as i32
}

/// `bytes` (in the database encoding) as UTF-8. `what` names the value
/// for the error raised when that is impossible.
pub fn to_utf8<'a>(bytes: &'a [u8], what: &dyn Fn() -> String) -> Cow<'a, [u8]> {
    let enc = database_encoding();
    if enc == pg_sys::pg_enc::PG_UTF8 as i32 || bytes.is_ascii() {
        return Cow::Borrowed(bytes);
    }
    if enc == pg_sys::pg_enc::PG_SQL_ASCII as i32 {
        if std::str::from_utf8(bytes).is_ok() {
            return Cow::Borrowed(bytes);
        }
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            format!(
                "{}: holds bytes that are not valid UTF-8, and JSON must be UTF-8",
                what()
            ),
            "pg_emit",
        )
        .set_detail(
            "The database encoding is SQL_ASCII, which gives bytes no meaning: pg_emit can \
             send them only when they already are UTF-8.",
        )
        .set_hint(
            "Store text as UTF-8, or use a database with a real encoding (UTF8, LATIN1, ...).",
        )
        .report(PgLogLevel::ERROR);
        unreachable!("ERROR returned")
    }
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    // SAFETY: converts `len` bytes of server-encoded text; raises PostgreSQL's
    // own ERROR for an untranslatable character. The result is a
    // NUL-terminated palloc'd string (row_to_json output has no NUL).
    unsafe {
        let out =
            pg_sys::pg_server_to_any(bytes.as_ptr().cast(), len, pg_sys::pg_enc::PG_UTF8 as i32);
        Cow::Owned(CStr::from_ptr(out).to_bytes().to_vec())
    }
}

/// A C string from the catalogs (a name, a trigger argument) as UTF-8.
/// `what` names it for the error [`to_utf8`] may raise.
///
/// # Safety
/// `p` must be a valid NUL-terminated string that outlives `'a`.
pub unsafe fn name<'a>(p: *const std::ffi::c_char, what: &dyn Fn() -> String) -> Cow<'a, str> {
    let bytes: &'a [u8] = CStr::from_ptr(p).to_bytes();
    match to_utf8(bytes, what) {
        // Valid: the database is UTF-8 (PostgreSQL checked it) or the
        // bytes were just validated or converted.
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(b) => Cow::Owned(String::from_utf8_lossy(&b).into_owned()),
    }
}

/// A message pg_emit wrote (an error, a receiver's response excerpt) as
/// text for this database: as it is in a UTF-8 database, with non-ASCII
/// characters as `?` in any other, where not every character has a
/// spelling and a failed conversion must not stop the worker.
pub fn message_text(s: &str) -> Cow<'_, str> {
    if database_is_utf8() || s.is_ascii() {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_ascii() { c } else { '?' })
                .collect(),
        )
    }
}
