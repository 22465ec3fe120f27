//! Stored destinations: `emit.create_destination`, `emit.alter_destination`,
//! `emit.drop_destination`, and the lookup that triggers and `send_message`
//! use to turn a name into a [`Destination`].
//!
//! The URL and options (headers with credentials) live in
//! `emit.stored_destinations`, readable only by superusers and `emit_admin`,
//! never in `pg_trigger`. Backends keep what they looked up; the three
//! functions invalidate the table's relcache entry, which every backend
//! hears at the changing transaction's commit, so a changed URL applies to
//! the next event everywhere.

use crate::delivery::Destination;
use crate::error::EmitError;
use crate::privileged::as_emit_owner;
use crate::security::Allowlist;
use pg_emit_core::destination::{self, Stored};
use pg_emit_core::options::Format;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A stored destination as events use it.
pub struct Resolved {
    /// [`Destination::Stored`]: its name and endpoint.
    pub target: Destination,
    pub format: Option<Format>,
    /// The allowlist this destination was last found allowed under: a
    /// trigger checks it once per allowlist, not once per row.
    pub allowed_under: RefCell<Option<Rc<Allowlist>>>,
}

impl Resolved {
    pub fn new(target: Destination, format: Option<Format>) -> Self {
        Resolved {
            target,
            format,
            allowed_under: RefCell::default(),
        }
    }
}

thread_local! {
    static CACHE: RefCell<HashMap<String, Rc<Resolved>>> = RefCell::default();
    /// emit.stored_destinations, to tell its invalidations from others'.
    static TABLE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

pub fn init() {
    // SAFETY: registering a static callback once, from _PG_init.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || relid == TABLE.get() {
        CACHE.with_borrow_mut(|c| c.clear());
    }
}

/// The oid of emit.stored_destinations.
fn table() -> pg_sys::Oid {
    // SAFETY: syscache lookups inside a transaction.
    let oid = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"emit".as_ptr(), false);
        pg_sys::get_relname_relid(c"stored_destinations".as_ptr(), nsp)
    };
    TABLE.set(oid);
    oid
}

/// The stored destination `name`; an ERROR naming `func` if there is none.
pub fn lookup(func: &'static str, name: &str) -> Rc<Resolved> {
    if let Some(r) = CACHE.with_borrow(|c| c.get(name).cloned()) {
        return r;
    }
    table();
    // A read-only SPI: pgrx's read-write one gives the transaction an xid,
    // and emit.create_capture must look up before anything has one.
    let row = as_emit_owner(|| {
        Spi::connect(|c| {
            c.select(
                "SELECT d.url, d.options::pg_catalog.text FROM emit.stored_destinations d \
                  WHERE d.name = $1",
                None,
                &[name.into()],
            )?
            .first()
            .get_two::<String, String>()
        })
    });
    let (url, options) = match row {
        Ok((Some(url), Some(options))) => (url, options),
        _ => EmitError::NoSuchDestination {
            func,
            name: name.to_string(),
        }
        .raise(),
    };
    // Checked when stored; a row edited by hand gets the same message.
    let Stored {
        endpoint,
        format,
        signing,
        tls,
        ..
    } = destination::parse_stored(&url, &options)
        .unwrap_or_else(|source| EmitError::Argument { func, source }.raise());
    let r = Rc::new(Resolved::new(
        Destination::Stored {
            name: name.to_string(),
            endpoint: Box::new(endpoint),
            signing,
            tls,
        },
        format,
    ));
    CACHE.with_borrow_mut(|c| c.insert(name.to_string(), r.clone()));
    r
}

/// A destination argument: a URL, or the name of a stored destination.
pub fn resolve(func: &'static str, dest: &str) -> Rc<Resolved> {
    if destination::is_url(dest) {
        let target = destination::parse_url(dest, Vec::new())
            .unwrap_or_else(|source| EmitError::Argument { func, source }.raise());
        return Rc::new(Resolved::new(target, None));
    }
    lookup(func, dest)
}

/// Whether a stored destination `name` exists now.
pub fn exists(name: &str) -> bool {
    stored(name).is_some()
}

/// Tells every backend (this one too) to forget what it looked up, once
/// the changing transaction commits.
fn invalidate() {
    // SAFETY: queues a relcache invalidation, sent at commit.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table()) };
}

/// Refuses a bad name, URL or options, and an endpoint the allowlist
/// cannot allow: a stored destination re-pointed at a refused address
/// would otherwise be found out at every use, by whoever fires it.
///
/// TLS files (`ca_file`, `cert_file`, `key_file`) are read by the server's
/// operating-system user, so naming them is reading server files: only
/// superusers and members of `pg_read_server_files` may set or change
/// them, or point them at another server (`was` holds the URL and options
/// before an alter: a role that may alter can change anything else and
/// keep the files, but not send the client certificate somewhere new).
/// They are read now, so a missing or unreadable file is an ERROR here
/// rather than a failure at every delivery.
fn check(func: &'static str, name: &str, url: &str, options: &str, was: Option<(&str, &str)>) {
    let stored = destination::check_name(name)
        .and_then(|()| destination::parse_stored(url, options))
        .unwrap_or_else(|source| EmitError::Argument { func, source }.raise());
    crate::delivery::refuse_unless_allowed(&|| func.to_string(), &stored.endpoint);
    // The TLS options of what is actually reached: a URL that routes by
    // table is checked filled in (every table's gets the same options).
    let tls_of = |s: &Stored, u: &str, o: &str| -> Option<pg_emit_core::transport::tls::Options> {
        match &s.endpoint {
            Destination::Broker(b) => b.tls_options().cloned(),
            Destination::Routed { .. } => {
                let filled = pg_emit_core::route::fill(u, "schema", "table");
                match destination::parse_stored(&filled, o).ok()?.endpoint {
                    Destination::Broker(b) => b.tls_options().cloned(),
                    _ => None,
                }
            }
            _ => Some(s.tls.clone()),
        }
    };
    let tls = tls_of(&stored, url, options);
    let Some(tls) = tls.as_ref().filter(|t| !t.is_empty()) else {
        return;
    };
    // The server a URL names: its scheme and authority, not its path.
    let server = |u: &str| {
        let (scheme, rest) = u.split_once("://").unwrap_or((u, ""));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        (
            scheme.to_ascii_lowercase(),
            rest[..end].to_ascii_lowercase(),
        )
    };
    let before = was
        .filter(|(old_url, _)| server(old_url) == server(url))
        .and_then(|(_, w)| destination::parse_stored(url, w).ok().map(|s| (s, w)))
        .and_then(|(s, w)| tls_of(&s, url, w));
    let names_files = tls.ca_file.is_some() || tls.cert_file.is_some();
    // SAFETY: plain catalog lookups about the current user.
    let may_read = unsafe {
        pg_sys::superuser()
            || pg_sys::has_privs_of_role(
                pg_sys::GetUserId(),
                pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES),
            )
    };
    if names_files && before.as_ref() != Some(tls) && !may_read {
        EmitError::NotAllowed {
            context: func.to_string(),
            why: "ca_file, cert_file and key_file name files the server reads: only superusers \
                  and members of pg_read_server_files may set them"
                .into(),
        }
        .raise();
    }
    if let Err(why) = tls.config() {
        EmitError::Argument {
            func,
            source: pg_emit_core::options::OptionError::Destination(format!("options: {why}")),
        }
        .raise();
    }
}

fn stored(name: &str) -> Option<(String, String)> {
    as_emit_owner(|| {
        Spi::get_two_with_args::<String, String>(
            "SELECT d.url, d.options::pg_catalog.text FROM emit.stored_destinations d \
              WHERE d.name = $1",
            &[name.into()],
        )
    })
    .ok()
    .and_then(|(u, o)| Some((u?, o?)))
}

#[pgrx::pg_schema]
mod emit {
    use super::*;
    use pgrx::JsonB;

    /// Stores a destination: `url` (tcp://, http://, https://) and
    /// `options` (`headers`, `format`). Credentials go here, not into
    /// trigger arguments, which every role can read in `pg_trigger`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn create_destination(name: &str, url: &str, options: default!(JsonB, "'{}'")) {
        let options = options.0.to_string();
        check("emit.create_destination", name, url, &options, None);
        if stored(name).is_some() {
            EmitError::DestinationExists(name.to_string()).raise();
        }
        as_emit_owner(|| {
            Spi::run_with_args(
                "INSERT INTO emit.stored_destinations (name, url, options) \
                 VALUES ($1, $2, $3::pg_catalog.jsonb)",
                &[name.into(), url.into(), options.as_str().into()],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("emit.create_destination: {e}"));
        invalidate();
    }

    /// Changes a stored destination's URL, options, or both (NULL keeps
    /// what is there). Events fired afterwards, and async events still
    /// queued, go to the new URL with the new options.
    #[pg_extern(volatile, parallel_unsafe)]
    fn alter_destination(
        name: Option<&str>,
        url: default!(Option<&str>, "NULL"),
        options: default!(Option<JsonB>, "NULL"),
    ) {
        let func = "emit.alter_destination";
        let Some(name) = name else {
            pgrx::pg_sys::panic::ErrorReport::new(
                pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                format!("{func}: name must not be NULL"),
                "pg_emit",
            )
            .report(pgrx::PgLogLevel::ERROR);
            unreachable!("ERROR returned")
        };
        let Some((old_url, old_options)) = stored(name) else {
            EmitError::NoSuchDestination {
                func,
                name: name.to_string(),
            }
            .raise()
        };
        let url = url.map_or(old_url.clone(), str::to_string);
        let options = options.map_or(old_options.clone(), |o| o.0.to_string());
        check(func, name, &url, &options, Some((&old_url, &old_options)));
        as_emit_owner(|| {
            Spi::run_with_args(
                "UPDATE emit.stored_destinations \
                    SET url = $2, options = $3::pg_catalog.jsonb, updated_at = pg_catalog.now() \
                  WHERE name = $1",
                &[name.into(), url.as_str().into(), options.as_str().into()],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("{func}: {e}"));
        invalidate();
    }

    /// Forgets a stored destination. Triggers that name it fail at their
    /// next firing; async events still queued for it wait (retried, then
    /// dead-lettered under pg_emit.max_age) until it is created again.
    #[pg_extern(volatile, parallel_unsafe)]
    fn drop_destination(name: &str) {
        let deleted = as_emit_owner(|| {
            Spi::get_one_with_args::<String>(
                "DELETE FROM emit.stored_destinations WHERE name = $1 RETURNING name",
                &[name.into()],
            )
        });
        if !matches!(deleted, Ok(Some(_))) {
            EmitError::NoSuchDestination {
                func: "emit.drop_destination",
                name: name.to_string(),
            }
            .raise();
        }
        invalidate();
    }
}
