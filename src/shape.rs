//! A table's [`Shape`] (what its row events carry and which columns key
//! them) where no trigger gives it: backfill's options and capture's
//! `tables`. Checked against the table when given, so that a mistyped
//! column is an ERROR then, not events that silently lack it.

use crate::error::EmitError;
use pg_emit_core::options::{Columns, Shape};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// A column of a table: its name, and how to hash its value as a
/// trigger's ordering key does.
pub struct Column {
    pub name: String,
    pub attnum: i16,
    /// A generated column's (which the WAL does not carry before
    /// PostgreSQL 18).
    pub generated: bool,
    /// Its place in the index it was read from (the primary key's: the
    /// order backfill reads rows in); 0 for a column read by name.
    pub place: i32,
    pub type_oid: pg_sys::Oid,
    pub collation: pg_sys::Oid,
    pub input: (pg_sys::Oid, pg_sys::Oid),
    pub typmod: i32,
    pub byval: bool,
    pub len: i16,
}

/// Which columns [`columns`] gives.
pub enum Which {
    /// The primary key's.
    Primary,
    /// The replica identity's: the primary key's unless the table names
    /// another index; none for `FULL` or `NOTHING`.
    Identity,
    /// Every column (not dropped), in the table's order.
    All,
}

/// Columns of `relid`, in the order of their numbers (as a trigger's key
/// takes the replica identity's).
pub fn columns(relid: pg_sys::Oid, which: Which) -> Vec<Column> {
    let from = match which {
        Which::Primary | Which::Identity => {
            let index = match which {
                Which::Primary => "i.indisprimary",
                _ => {
                    "((r.relreplident = 'd' AND i.indisprimary) \
                      OR (r.relreplident = 'i' AND i.indisreplident))"
                }
            };
            format!(
                "pg_catalog.array_position(i.indkey::pg_catalog.int2[], a.attnum) \
                   FROM pg_catalog.pg_index i \
                   JOIN pg_catalog.pg_class r ON r.oid = i.indrelid \
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid \
                    AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey::pg_catalog.int2[]) \
                   JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                  WHERE i.indrelid = $1 AND {index}"
            )
        }
        Which::All => "0 FROM pg_catalog.pg_attribute a \
                         JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                        WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
            .to_string(),
    };
    Spi::connect(|c| {
        c.select(
            &format!(
                "SELECT a.attname::pg_catalog.text, a.atttypid, a.atttypmod, t.typbyval, \
                        t.typlen, a.attnum, a.attgenerated <> '', a.attcollation, {from} \
                   ORDER BY a.attnum"
            ),
            None,
            &[relid.into()],
        )?
        .map(|r| {
            let typ = r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid);
            let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            // SAFETY: a catalog lookup of the column's type.
            unsafe { pg_sys::getTypeInputInfo(typ, &mut func, &mut ioparam) };
            Ok(Column {
                name: r.get::<String>(1)?.unwrap_or_default(),
                type_oid: typ,
                collation: r.get::<pg_sys::Oid>(8)?.unwrap_or(pg_sys::InvalidOid),
                input: (func, ioparam),
                typmod: r.get::<i32>(3)?.unwrap_or(-1),
                byval: r.get::<bool>(4)?.unwrap_or(false),
                len: r.get::<i16>(5)?.unwrap_or(-1),
                attnum: r.get::<i16>(6)?.unwrap_or(0),
                generated: r.get::<bool>(7)?.unwrap_or(false),
                place: r.get::<i32>(9)?.unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| pgrx::error!("pg_emit: could not read the columns of a table: {e}"))
}

/// A [`Shape`] checked against its table.
pub struct Checked {
    /// The columns its events carry, by name in their order (`None`:
    /// every column).
    pub carried: Option<Vec<String>>,
    /// Its key's columns in the key's order (`None`: the replica
    /// identity's).
    pub key: Option<Vec<Column>>,
    /// The number of each column it names.
    pub attnums: Vec<(String, i16)>,
}

/// `shape` checked against table `relid` (`name` in errors). `logged`
/// (capture): the columns it names must be ones the WAL carries (not
/// generated), and the key's ones a DELETE's WAL record carries, the
/// replica identity's or, with `REPLICA IDENTITY FULL`, any.
pub fn check(
    func: &'static str,
    relid: pg_sys::Oid,
    name: &str,
    shape: &Shape,
    logged: bool,
) -> Checked {
    let mut all = columns(relid, Which::All);
    let mut attnums = Vec::new();
    let unknown = |option: &str, column: &str| -> ! {
        EmitError::bad_option_code(
            func,
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("{option}: column {column:?} of {name} does not exist"),
        )
    };
    let mut find = |option: &str, column: &String| {
        let Some(c) = all.iter().find(|c| c.name == *column) else {
            unknown(option, column)
        };
        // (Excluding one is harmless: it is not there to send.)
        if logged && c.generated && option != "exclude" {
            EmitError::bad_option(
                func,
                format!(
                    "{option}: column {column:?} of {name} is generated, which the WAL does not \
                     carry"
                ),
            )
        }
        attnums.push((column.clone(), c.attnum));
    };
    let carried = match &shape.columns {
        Columns::All => None,
        Columns::Only(cols) => {
            cols.iter().for_each(|c| find("columns", c));
            Some(cols.clone())
        }
        Columns::Except(cols) => {
            cols.iter().for_each(|c| find("exclude", c));
            Some(
                all.iter()
                    .map(|c| c.name.clone())
                    .filter(|n| !cols.contains(n))
                    .collect(),
            )
        }
    };
    let Some(key) = &shape.key else {
        return Checked {
            carried,
            key: None,
            attnums,
        };
    };
    key.iter().for_each(|c| find("key", c));
    if logged {
        // (A read-only SPI: capture's slot needs a transaction without
        // an xid, which pgrx's read-write one would give it.)
        let full = Spi::connect(|c| {
            c.select(
                "SELECT c.relreplident OPERATOR(pg_catalog.=) 'f' FROM pg_catalog.pg_class c \
                  WHERE c.oid = $1",
                None,
                &[relid.into()],
            )?
            .first()
            .get_one::<bool>()
        })
        .unwrap_or_else(|e| pgrx::error!("{func}: {e}"))
        .unwrap_or(false);
        let identity = columns(relid, Which::Identity);
        if let Some(c) = key
            .iter()
            .find(|k| !full && !identity.iter().any(|i| i.name == **k))
        {
            EmitError::bad_option(
                func,
                format!(
                    "key: column {c:?} of {name} is not in its replica identity, which is all \
                     the WAL keeps of a deleted row (key by identity columns, or ALTER TABLE … \
                     REPLICA IDENTITY FULL)"
                ),
            )
        }
    }
    let key = key
        .iter()
        .map(|k| {
            let i = all
                .iter()
                .position(|c| c.name == *k)
                .expect("checked above");
            all.swap_remove(i)
        })
        .collect();
    Checked {
        carried,
        key: Some(key),
        attnums,
    }
}
