//! `row_to_socket`, `row_to_http` and `row_to_destination`: trigger event
//! → JSON → destination.
//!
//! Both are raw fmgr entry points rather than `#[pg_trigger]`, so that a
//! direct call (`SELECT row_to_socket()`) is a clean 39P01 instead of a
//! panic, and the row goes back to PostgreSQL without being re-wrapped.

use crate::delivery::{commit, outbox, sync, Destination};
use crate::encoding;
use crate::error::EmitError;
use crate::event::{self, Event, Kind, Op};
use crate::made::Made;
use crate::options::{self, Columns, Delivery, Format, OptionError, Options, Unchanged};
use crate::settings;
use crate::stored::{self, Resolved};
use pg_emit_core::destination;
use pg_emit_core::schedule::Key;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::CStr;
use std::rc::Rc;

extern "C-unwind" {
    /// PostgreSQL's own `row_to_json(record)`: calling it directly gives
    /// receivers exactly the JSON that SQL users see, for every type,
    /// including domains, composites and extension types.
    fn row_to_json(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    /// PostgreSQL's binary equality of two non-NULL values of one type
    /// (detoasting as needed): what `unchanged=skip` calls unchanged, as
    /// logical replication does.
    fn datum_image_eq(
        value1: pg_sys::Datum,
        value2: pg_sys::Datum,
        typ_by_val: bool,
        typ_len: std::ffi::c_int,
    ) -> bool;
}

thread_local! {
    /// Reused envelope buffer: one allocation per backend, not per row.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Parsed arguments per trigger, so a row costs a comparison of the
    /// argument strings instead of a parse with allocations.
    static PLANS: RefCell<Vec<Rc<Plan>>> = const { RefCell::new(Vec::new()) };
    /// Schema name per relation, so a row costs no catalog lookup.
    static SCHEMAS: RefCell<Vec<(pg_sys::Oid, pg_sys::Oid, Rc<str>)>> =
        const { RefCell::new(Vec::new()) };
    /// Destinations that route by table, filled in per table: the template
    /// (kept alive, so its address is never another's), the schema and
    /// table, and the filled-in destination.
    static ROUTED: RefCell<Vec<Routed>> = const { RefCell::new(Vec::new()) };
}

type Routed = (Rc<Resolved>, Rc<str>, String, Rc<Resolved>);

/// Filled-in destinations a backend keeps.
const ROUTED_KEPT: usize = 256;

/// `dest` for this firing's table when it routes by table (see
/// [`pg_emit_core::route`]), else `dest`. A name the broker cannot take
/// (a Kafka topic with a space) is an ERROR naming the trigger.
fn routed(dest: Rc<Resolved>, firing: &Firing<'_>) -> Rc<Resolved> {
    if !matches!(dest.target.endpoint(), Destination::Routed { .. }) {
        return dest;
    }
    ROUTED.with_borrow_mut(|kept| {
        let found = kept.iter().find(|(t, s, tb, _)| {
            Rc::ptr_eq(t, &dest) && **s == *firing.schema && *tb == *firing.table
        });
        if let Some((.., r)) = found {
            return r.clone();
        }
        let target = dest
            .target
            .routed(&firing.schema, &firing.table)
            .unwrap_or_else(|source| {
                EmitError::TriggerArgument {
                    trigger: firing.describe(),
                    func: firing.func.name(),
                    source,
                }
                .raise()
            })
            .expect("a destination that routes by table");
        let r = Rc::new(Resolved::new(target, dest.format));
        if kept.len() >= ROUTED_KEPT {
            kept.clear();
        }
        kept.push((
            dest.clone(),
            firing.schema.clone(),
            firing.table.to_string(),
            r.clone(),
        ));
        r
    })
}

/// A trigger's arguments, parsed. Keyed by trigger oid and checked against
/// the arguments it was parsed from (`CREATE OR REPLACE TRIGGER` keeps the
/// oid but may change them).
struct Plan {
    tgoid: pg_sys::Oid,
    func: Func,
    /// The arguments as stored (database encoding), for [`Plan::matches`].
    raw: Vec<Vec<u8>>,
    /// The arguments as UTF-8.
    args: Vec<String>,
    dest: PlanDest,
    opts: Options,
    /// `key=` columns as attribute numbers, for this relation.
    key_attnums: RefCell<Option<(pg_sys::Oid, Rc<[i32]>)>>,
}

/// Where a trigger sends: fixed by its arguments, or a stored destination
/// looked up at each firing (so a changed URL applies to the next row).
enum PlanDest {
    Fixed(Rc<Resolved>),
    Stored(String),
}

impl Plan {
    fn destination(&self) -> Rc<Resolved> {
        match &self.dest {
            PlanDest::Fixed(r) => r.clone(),
            PlanDest::Stored(name) => stored::lookup(self.func.name(), name),
        }
    }

    /// The trigger's own `format=`, else the stored destination's (see
    /// [`Format::combine`]); a combination that cannot work is an ERROR
    /// naming the trigger.
    fn format(&self, dest: &Resolved, firing: &Firing<'_>) -> Format {
        let http = matches!(dest.target.endpoint(), Destination::Http { .. });
        Format::combine(self.opts.format, self.opts.cloudevents, dest.format, http).unwrap_or_else(
            |source| {
                EmitError::TriggerArgument {
                    trigger: firing.describe(),
                    func: self.func.name(),
                    source,
                }
                .raise()
            },
        )
    }
}

impl Plan {
    fn matches(&self, tg: &pg_sys::Trigger, func: Func) -> bool {
        let n = usize::try_from(tg.tgnargs).unwrap_or(0);
        self.tgoid == tg.tgoid
            && self.func == func
            && self.raw.len() == n
            // SAFETY: tgargs holds tgnargs C strings.
            && (0..n).all(|i| unsafe { CStr::from_ptr(*tg.tgargs.add(i)) }.to_bytes() == self.raw[i])
    }
}

/// Registers the invalidation that keeps [`SCHEMAS`] right across
/// `ALTER SCHEMA ... RENAME`. (A table moved to another schema changes its
/// namespace oid, which the cache compares on every lookup.)
pub fn init() {
    // SAFETY: registering a static callback once, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(forget_schemas),
            pg_sys::Datum::from(0),
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_schemas(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    SCHEMAS.with_borrow_mut(|s| s.clear());
}

fn schema_of(relid: pg_sys::Oid, nsp: pg_sys::Oid) -> Rc<str> {
    if let Some(name) = SCHEMAS.with_borrow(|s| {
        s.iter()
            .find(|(r, n, _)| *r == relid && *n == nsp)
            .map(|(_, _, name)| name.clone())
    }) {
        return name;
    }
    // SAFETY: a valid namespace oid of an open relation; result is palloc'd.
    let ptr = unsafe { pg_sys::get_namespace_name(nsp) };
    let name: Rc<str> = if ptr.is_null() {
        "".into()
    } else {
        // SAFETY: a NUL-terminated name from the catalog.
        unsafe { encoding::name(ptr, &|| format!("the name of schema {}", nsp.to_u32())) }.into()
    };
    SCHEMAS.with_borrow_mut(|s| {
        s.retain(|(r, _, _)| *r != relid);
        s.push((relid, nsp, name.clone()));
    });
    name
}

/// The two trigger functions differ only in how their arguments name the
/// destination.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Func {
    Socket,
    Http,
    Destination,
}

impl Func {
    fn name(self) -> &'static str {
        match self {
            Func::Socket => "row_to_socket",
            Func::Http => "row_to_http",
            Func::Destination => "row_to_destination",
        }
    }

    fn parse(self, args: &[&str]) -> Result<(PlanDest, Options), OptionError> {
        let fixed = |target| PlanDest::Fixed(Rc::new(Resolved::new(target, None)));
        match self {
            Func::Socket => {
                let t = options::parse_socket_args(args)?;
                let target = Destination::Tcp {
                    host: t.host,
                    port: t.port,
                    framing: t.options.framing,
                };
                Ok((fixed(target), t.options))
            }
            Func::Http => {
                let t = options::parse_http_args(args)?;
                let target = Destination::Http {
                    url: t.url.url,
                    headers: t.options.headers.clone(),
                };
                Ok((fixed(target), t.options))
            }
            Func::Destination => {
                let dest = args.first().ok_or(OptionError::MissingDestination)?;
                let opts = options::parse_options(&args[1..], 2, options::Kind::Destination)?;
                if destination::is_url(dest) {
                    Ok((fixed(destination::parse_url(dest, Vec::new())?), opts))
                } else {
                    destination::check_name(dest)?;
                    Ok((PlanDest::Stored(dest.to_string()), opts))
                }
            }
        }
    }
}

/// The parts of a firing that the envelope needs, read once.
struct Firing<'a> {
    func: Func,
    td: &'a pg_sys::TriggerData,
    name: Cow<'a, str>,
    schema: Rc<str>,
    table: Cow<'a, str>,
}

impl Firing<'_> {
    fn describe(&self) -> String {
        format!(
            "{} trigger \"{}\" on \"{}\".\"{}\"",
            self.func.name(),
            self.name,
            self.schema,
            self.table
        )
    }
}

/// The columns a row event carries in `new` and `old` (`columns=`,
/// `exclude=`), resolved for one firing: names are looked up in the
/// relation as it is now, so a dropped or renamed column is an ERROR at the
/// next row rather than a wrong one.
struct Carried {
    /// Attribute numbers, in the order the event lists them.
    attnums: Vec<i16>,
    /// A descriptor of just those columns (blessed, for `row_to_json`);
    /// `None` when the event carries every column.
    desc: Option<pg_sys::TupleDesc>,
}

/// What `plan`'s row events carry; `None` when that is every column and
/// nothing needs to know which (the common case costs nothing).
fn carried(firing: &Firing<'_>, plan: &Plan, op: Op) -> Option<Carried> {
    let skip = plan.opts.unchanged == Unchanged::Skip && op == Op::Update;
    if plan.opts.columns == Columns::All && !skip {
        return None;
    }
    // SAFETY: the relation is open for the firing.
    let rel = unsafe { &*firing.td.tg_relation };
    // SAFETY: its descriptor, borrowed for the firing.
    let atts = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(rel.rd_att) };
    let live = || atts.iter().filter(|a| !a.attisdropped);
    let find = |option: &'static str, name: &str| -> i16 {
        live()
            // SAFETY: attname is a NUL-terminated NameData.
            .find(|a| {
                unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes() == name.as_bytes()
            })
            .map(|a| a.attnum)
            .unwrap_or_else(|| {
                EmitError::UnknownColumn {
                    trigger: firing.describe(),
                    option,
                    column: name.to_string(),
                }
                .raise()
            })
    };
    let attnums: Vec<i16> = match &plan.opts.columns {
        Columns::All => {
            return Some(Carried {
                attnums: live().map(|a| a.attnum).collect(),
                desc: None,
            })
        }
        Columns::Only(names) => names.iter().map(|n| find("columns", n)).collect(),
        Columns::Except(names) => {
            let out: Vec<i16> = names.iter().map(|n| find("exclude", n)).collect();
            live()
                .map(|a| a.attnum)
                .filter(|n| !out.contains(n))
                .collect()
        }
    };
    // SAFETY: a new descriptor in the firing's memory context, its entries
    // copied from the relation's; blessing registers (or finds) its record
    // type, which row_to_json looks up.
    let desc = unsafe {
        let d = pg_sys::CreateTemplateTupleDesc(attnums.len() as std::ffi::c_int);
        for (i, attnum) in attnums.iter().enumerate() {
            pg_sys::TupleDescCopyEntry(d, (i + 1) as pg_sys::AttrNumber, rel.rd_att, *attnum);
        }
        pg_sys::BlessTupleDesc(d)
    };
    Some(Carried {
        attnums,
        desc: Some(desc),
    })
}

/// Serializes a heap tuple, or the columns of it that `carried` names,
/// with `row_to_json`. TOASTed values are detoasted by
/// `heap_copy_tuple_as_datum`, so receivers always get whole values,
/// however large.
///
/// # Safety
/// `tuple` and `desc` must belong to the firing's relation.
unsafe fn tuple_json<'a>(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    carried: Option<&Carried>,
) -> &'a [u8] {
    let datum = match carried.and_then(|c| c.desc.map(|d| (c, d))) {
        None => pg_sys::heap_copy_tuple_as_datum(tuple, desc),
        Some((c, sub)) => {
            let (mut values, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = c
                .attnums
                .iter()
                .map(|&n| {
                    let mut isnull = false;
                    let v = pg_sys::heap_getattr(tuple, i32::from(n), desc, &mut isnull);
                    (v, isnull)
                })
                .unzip();
            return values_json(sub, &mut values, &mut nulls);
        }
    };
    datum_json(datum)
}

/// `row_to_json` of a row made of `values` (NULL where `nulls` says),
/// described by the blessed `desc`. Capture makes its rows this way from
/// the values it decodes, so its events read as a trigger's would.
///
/// # Safety
/// `values` and `nulls` must hold one entry per attribute of `desc`, of
/// its types.
pub(crate) unsafe fn values_json<'a>(
    desc: pg_sys::TupleDesc,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
) -> &'a [u8] {
    let t = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
    datum_json(pg_sys::heap_copy_tuple_as_datum(t, desc))
}

/// # Safety
/// `datum` must be a composite value of a blessed row type.
unsafe fn datum_json<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    let json = pg_sys::DirectFunctionCall1Coll(Some(row_to_json), pg_sys::InvalidOid, datum);
    pgrx::varlena::varlena_to_byte_slice(json.cast_mut_ptr::<pg_sys::varlena>())
}

/// Whether an UPDATE left every carried column as it was (NULL stays
/// NULL, values binary-equal).
///
/// # Safety
/// `old`, `new` and `desc` must belong to the firing's relation.
unsafe fn unchanged(
    old: pg_sys::HeapTuple,
    new: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    carried: &Carried,
) -> bool {
    let atts = pgrx::PgTupleDesc::from_pg_unchecked(desc);
    carried.attnums.iter().all(|&n| {
        let (mut old_null, mut new_null) = (false, false);
        let a = pg_sys::heap_getattr(old, i32::from(n), desc, &mut old_null);
        let b = pg_sys::heap_getattr(new, i32::from(n), desc, &mut new_null);
        match (old_null, new_null, atts.get((n - 1) as usize)) {
            (true, true, _) => true,
            (false, false, Some(att)) => {
                datum_image_eq(a, b, att.attbyval, std::ffi::c_int::from(att.attlen))
            }
            _ => false,
        }
    })
}

fn op_of(event: u32) -> Op {
    match event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
        pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
        pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
        _ => Op::Truncate,
    }
}

fn when_of(event: u32) -> &'static str {
    match event & pg_sys::TRIGGER_EVENT_TIMINGMASK {
        pg_sys::TRIGGER_EVENT_BEFORE => "BEFORE",
        pg_sys::TRIGGER_EVENT_INSTEAD => "INSTEAD OF",
        _ => "AFTER",
    }
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_row_to_socket() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_row_to_http() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Sends each row change (or TRUNCATE) to `host:port` as JSON.
/// Arguments: `(host, port [, 'key=value' ...])`, see [`options`].
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn row_to_socket(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    entry(fcinfo, Func::Socket)
}

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_row_to_destination() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Sends each row change (or TRUNCATE) to a destination URL or a stored
/// destination. Arguments: `(dest [, 'key=value' ...])`.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn row_to_destination(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    entry(fcinfo, Func::Destination)
}

/// POSTs each row change (or TRUNCATE) to a URL as JSON.
/// Arguments: `(url [, 'key=value' ...])`, see [`options`].
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn row_to_http(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    entry(fcinfo, Func::Http)
}

unsafe fn entry(fcinfo: pg_sys::FunctionCallInfo, func: Func) -> pg_sys::Datum {
    if !pgrx::trigger_support::called_as_trigger(fcinfo) {
        EmitError::NotTrigger(func.name()).raise();
    }
    // SAFETY: the trigger manager passes a TriggerData as context.
    let td = &*((*fcinfo).context as *const pg_sys::TriggerData);
    fire(td, func)
}

fn fire(td: &pg_sys::TriggerData, func: Func) -> pg_sys::Datum {
    // SAFETY: a TriggerData always carries its Trigger.
    let tg = unsafe { &*td.tg_trigger };
    // SAFETY: PostgreSQL hands us an open relation with a valid rd_rel.
    let (rel, relid, namespace) = unsafe {
        let rel = &*td.tg_relation;
        (rel, rel.rd_id, (*rel.rd_rel).relnamespace)
    };
    // SAFETY: trigger and relation names are NUL-terminated and outlive
    // the firing.
    let firing = Firing {
        func,
        td,
        name: unsafe { encoding::name(tg.tgname, &|| "the trigger's name".into()) },
        schema: schema_of(relid, namespace),
        table: unsafe {
            encoding::name((*rel.rd_rel).relname.data.as_ptr(), &|| {
                format!("the name of table {}", relid.to_u32())
            })
        },
    };
    let plan = plan_for(tg, &firing);
    let dest = routed(plan.destination(), &firing);
    let (target, opts) = (&dest.target, &plan.opts);
    let format = plan.format(&dest, &firing);
    let mode = delivery_mode(&firing, &dest, opts);

    let event = td.tg_event;
    let op = op_of(event);
    let row_level = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    // A BEFORE (or INSTEAD OF) row trigger must hand the row back, or
    // PostgreSQL would skip the operation; AFTER triggers' results are
    // ignored.
    let before = event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER;
    let handed_back = pg_sys::Datum::from(match (row_level && before, op) {
        (false, _) => std::ptr::null_mut(),
        (true, Op::Update) => td.tg_newtuple,
        (true, _) => td.tg_trigtuple,
    });
    let carried = carried(&firing, &plan, op);
    if !row_level && op != Op::Truncate {
        fire_statement(&firing, &plan, carried.as_ref(), target, format, mode);
        return pg_sys::Datum::from(0);
    }
    // SAFETY: tuples and descriptor come from the firing itself.
    let desc = unsafe { (*td.tg_relation).rd_att };
    if row_level && op == Op::Update && plan.opts.unchanged == Unchanged::Skip {
        if let Some(c) = &carried {
            // SAFETY: as above.
            if unsafe { unchanged(td.tg_trigtuple, td.tg_newtuple, desc, c) } {
                return handed_back;
            }
        }
    }
    let c = carried.as_ref();
    // SAFETY: as above.
    let (new, old) = unsafe {
        match (row_level, op) {
            (false, _) => (None, None),
            (true, Op::Insert) => (Some(tuple_json(td.tg_trigtuple, desc, c)), None),
            (true, Op::Update) => (
                Some(tuple_json(td.tg_newtuple, desc, c)),
                Some(tuple_json(td.tg_trigtuple, desc, c)),
            ),
            (true, _) => (None, Some(tuple_json(td.tg_trigtuple, desc, c))),
        }
    };
    // The ordering key of async events and of sinks that route by it
    // (Kafka's partitions): the trigger's key columns, else the row's
    // replica identity (its primary key unless the table says otherwise),
    // before an UPDATE. Kafka's `record_key: "columns"` also takes those
    // columns' values as JSON, as Debezium keys records.
    let keyed = mode == Delivery::Async || target.keyed();
    let (order, text) = match op {
        Op::Insert | Op::Update | Op::Delete if row_level && keyed => {
            let cols = key_columns(&firing, &plan);
            // SAFETY: the firing's own relation and tuple.
            unsafe {
                let rel = td.tg_relation;
                match key_attnums(rel, cols.as_deref()) {
                    None => (None, None),
                    Some(attnums) => (
                        Some(row_key(rel, td.tg_trigtuple, &attnums)),
                        target.record_keys().then(|| {
                            crate::privileged::with_key_output(|| {
                                key_json(rel, td.tg_trigtuple, &attnums)
                            })
                        }),
                    ),
                }
            }
        }
        _ => (None, None),
    };
    let text = text.map(|b| encoding::to_utf8(b, &|| format!("a key for {}", firing.describe())));
    let text = text
        .as_deref()
        .map(|t| std::str::from_utf8(t).unwrap_or_default());
    let key = Key { order, text };
    let what = || format!("a row for {}", firing.describe());
    let new = new.map(|b| encoding::to_utf8(b, &what));
    let old = old.map(|b| encoding::to_utf8(b, &what));

    let args: Vec<&str> = match format {
        Format::Td => plan.args.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    let made = Made::now(format, mode);
    let ev = Event {
        op,
        schema: &firing.schema,
        table: &firing.table,
        when: when_of(event),
        level: if row_level { "ROW" } else { "STATEMENT" },
        trigger_name: &firing.name,
        relid: relid.to_u32(),
        args: &args,
        ctx: made.ctx(),
    };
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        event::write_event(
            buf,
            format,
            &ev,
            new.as_deref(),
            old.as_deref(),
            one_line(target, mode),
        );
        send(&firing, target, format, mode, buf, key);
        // Large rows must not pin megabytes per backend for its lifetime.
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
    });

    handed_back
}

/// The columns that key a row: `columns` (the trigger's `key=`), else its
/// replica identity's (the primary key by default); `None` for a table
/// without one (its events are then ordered against every other event).
///
/// # Safety
/// `rel` must be open.
unsafe fn key_attnums(rel: pg_sys::Relation, columns: Option<&[i32]>) -> Option<Vec<i32>> {
    if let Some(c) = columns {
        return Some(c.to_vec());
    }
    let cols = pg_sys::RelationGetIndexAttrBitmap(
        rel,
        pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY,
    );
    if cols.is_null() {
        return None;
    }
    let mut out = Vec::new();
    let mut member = -1;
    loop {
        member = pg_sys::bms_next_member(cols, member);
        if member < 0 {
            break;
        }
        out.push(member + pg_sys::FirstLowInvalidHeapAttributeNumber);
    }
    pg_sys::bms_free(cols);
    Some(out)
}

/// A row's key columns as a JSON object (`row_to_json` of just them, in
/// the order of `attnums`): Debezium's record key with schemas off.
///
/// # Safety
/// `rel` and `tuple` must belong to the firing; `attnums` are its columns.
unsafe fn key_json<'a>(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    attnums: &[i32],
) -> &'a [u8] {
    let desc = (*rel).rd_att;
    let sub = pg_sys::CreateTemplateTupleDesc(attnums.len() as std::ffi::c_int);
    for (i, &attnum) in attnums.iter().enumerate() {
        pg_sys::TupleDescCopyEntry(
            sub,
            (i + 1) as pg_sys::AttrNumber,
            desc,
            attnum as pg_sys::AttrNumber,
        );
    }
    let sub = pg_sys::BlessTupleDesc(sub);
    let (mut values, mut nulls): (Vec<pg_sys::Datum>, Vec<bool>) = attnums
        .iter()
        .map(|&n| {
            let mut isnull = false;
            let v = pg_sys::heap_getattr(tuple, n, desc, &mut isnull);
            (v, isnull)
        })
        .unzip();
    values_json(sub, &mut values, &mut nulls)
}

/// A row's ordering key: its key columns' values hashed with the table's
/// oid.
///
/// # Safety
/// `rel` and `tuple` must belong to the firing; `attnums` are its columns.
unsafe fn row_key(rel: pg_sys::Relation, tuple: pg_sys::HeapTuple, attnums: &[i32]) -> i64 {
    let desc = (*rel).rd_att;
    // pgrx's accessor: PostgreSQL 18 moved the attributes behind compact
    // ones, so the array is not reached directly.
    let atts = pgrx::PgTupleDesc::from_pg_unchecked(desc);
    let mut parts: Vec<Option<Cow<'_, [u8]>>> = vec![Some(Cow::Owned(
        (*rel).rd_id.to_u32().to_le_bytes().to_vec(),
    ))];
    for &attnum in attnums {
        let mut isnull = false;
        let datum = pg_sys::heap_getattr(tuple, attnum, desc, &mut isnull);
        let att = atts.get((attnum - 1) as usize).filter(|_| !isnull);
        parts.push(att.map(|att| datum_bytes(datum, att)));
    }
    pg_emit_core::schedule::key_hash(parts.iter().map(|p| p.as_deref()))
}

/// The attribute numbers of the trigger's `key=` columns, looked up once
/// per plan (and relation); `None` without the option. A column that does
/// not exist is an ERROR naming the trigger.
fn key_columns(firing: &Firing<'_>, plan: &Plan) -> Option<Rc<[i32]>> {
    let names = plan.opts.key.as_ref()?;
    // SAFETY: the relation is open for the firing.
    let rel = unsafe { &*firing.td.tg_relation };
    if let Some((relid, cols)) = plan.key_attnums.borrow().as_ref() {
        if *relid == rel.rd_id {
            return Some(cols.clone());
        }
    }
    let cols: Rc<[i32]> = names
        .iter()
        .map(|name| {
            let c = std::ffi::CString::new(name.as_str()).unwrap_or_default();
            // SAFETY: a catalog lookup by name in the firing's relation.
            let attnum = unsafe { pg_sys::get_attnum(rel.rd_id, c.as_ptr()) };
            if attnum <= 0 {
                EmitError::TriggerEvent {
                    trigger: firing.describe(),
                    problem: format!("key=: column {name:?} does not exist"),
                }
                .raise();
            }
            i32::from(attnum)
        })
        .collect();
    *plan.key_attnums.borrow_mut() = Some((rel.rd_id, cols.clone()));
    Some(cols)
}

/// The bytes of a datum's value (detoasted), to hash it.
///
/// # Safety
/// `datum` must be a non-NULL value of the type `att` describes; borrowed
/// bytes live as long as the current memory context.
pub(crate) unsafe fn datum_bytes<'a>(
    datum: pg_sys::Datum,
    att: &pg_sys::FormData_pg_attribute,
) -> Cow<'a, [u8]> {
    value_bytes(datum, att.attbyval, att.attlen)
}

/// [`datum_bytes`] of a value of a type passed by value (`byval`) or of
/// length `len` (-1: varlena, -2: C string).
///
/// # Safety
/// As [`datum_bytes`].
pub(crate) unsafe fn value_bytes<'a>(datum: pg_sys::Datum, byval: bool, len: i16) -> Cow<'a, [u8]> {
    match len {
        _ if byval => {
            let n = usize::try_from(len).unwrap_or(8).min(8);
            Cow::Owned(datum.value().to_le_bytes()[..n].to_vec())
        }
        -1 => {
            let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            Cow::Borrowed(pgrx::varlena::varlena_to_byte_slice(v))
        }
        -2 => Cow::Borrowed(std::ffi::CStr::from_ptr(datum.cast_mut_ptr()).to_bytes()),
        n => Cow::Borrowed(std::slice::from_raw_parts(
            datum.cast_mut_ptr::<u8>(),
            n as usize,
        )),
    }
}

/// Async events are stored one per line, and ndjson sends one per line.
fn one_line(target: &Destination, mode: Delivery) -> bool {
    target.coalesces() || mode == Delivery::Async
}

/// Hands one finished message of `format` in `buf` to its delivery mode.
fn send(
    firing: &Firing<'_>,
    target: &Destination,
    format: Format,
    mode: Delivery,
    buf: &mut Vec<u8>,
    key: Key<'_>,
) {
    if target.coalesces() && mode != Delivery::Async {
        buf.push(b'\n');
    }
    let context = || firing.describe();
    let limit = settings::max_message_bytes();
    if buf.len() > limit {
        EmitError::TooLarge {
            context: context(),
            size: buf.len(),
            limit,
        }
        .raise();
    }
    match mode {
        Delivery::Sync => sync::deliver(&context, target, format, buf, key),
        Delivery::Commit => commit::hold(&context, target, Kind::event(format), buf, key),
        Delivery::Async => outbox::queue(target, Kind::event(format), buf, key),
    }
}

/// A statement-level trigger with transition tables: all changed rows in
/// one message (`"rows":[{"new":..,"old":..},..]`), split into several
/// when it grows past `pg_emit.statement_batch_size`. For UPDATE the old
/// and new transition tables hold the rows in the same order, so they are
/// read in lockstep and paired.
fn fire_statement(
    firing: &Firing<'_>,
    plan: &Plan,
    carried: Option<&Carried>,
    target: &Destination,
    format: Format,
    mode: Delivery,
) {
    let td = firing.td;
    let (new_ts, old_ts) = (td.tg_newtable, td.tg_oldtable);
    if new_ts.is_null() && old_ts.is_null() {
        EmitError::TriggerEvent {
            trigger: firing.describe(),
            problem: format!(
                "a statement-level {} trigger needs REFERENCING NEW TABLE AS ... and/or \
                 OLD TABLE AS ... to have rows to send (or create it FOR EACH ROW)",
                op_of(td.tg_event).name()
            ),
        }
        .raise();
    }
    let args: Vec<&str> = match format {
        Format::Td => plan.args.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    // SAFETY: the relation is open for the firing.
    let relid = unsafe { (*td.tg_relation).rd_id };
    let mut made = Made::now(format, mode);
    let ev = Event {
        op: op_of(td.tg_event),
        schema: &firing.schema,
        table: &firing.table,
        when: when_of(td.tg_event),
        level: "STATEMENT",
        trigger_name: &firing.name,
        relid: relid.to_u32(),
        args: &args,
        ctx: Default::default(),
    };
    let cap = settings::statement_batch_bytes();
    let one_line = one_line(target, mode);
    // SAFETY: transition tables and the descriptor belong to this firing;
    // each gets its own read pointer so other triggers reading the same
    // tables are not disturbed.
    unsafe {
        let desc = (*td.tg_relation).rd_att;
        let open = |ts: *mut pg_sys::Tuplestorestate| {
            if ts.is_null() {
                return None;
            }
            let ptr = pg_sys::tuplestore_alloc_read_pointer(ts, 0);
            let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
            Some((ts, ptr, slot))
        };
        let (new_r, old_r) = (open(new_ts), open(old_ts));
        for (ts, ptr, _) in new_r.iter().chain(old_r.iter()) {
            pg_sys::tuplestore_select_read_pointer(*ts, *ptr);
            pg_sys::tuplestore_rescan(*ts);
        }
        // Row JSON is built in a context reset per row: a million-row
        // statement must not keep a million detoasted rows in memory.
        let mut rows_cx = PgMemoryContexts::new("pg_emit statement rows");
        let what = || format!("a row for {}", firing.describe());
        let mut buf = Vec::new();
        let mut in_message = 0usize;
        let skip_unchanged = plan.opts.unchanged == Unchanged::Skip;
        loop {
            // The next row of a transition table, as a heap tuple in the
            // per-row context.
            let next = |r: &Option<(
                *mut pg_sys::Tuplestorestate,
                i32,
                *mut pg_sys::TupleTableSlot,
            )>|
             -> Option<pg_sys::HeapTuple> {
                let (ts, ptr, slot) = (*r)?;
                pg_sys::tuplestore_select_read_pointer(ts, ptr);
                if !pg_sys::tuplestore_gettupleslot(ts, true, false, slot) {
                    return None;
                }
                Some(pg_sys::ExecFetchSlotHeapTuple(
                    slot,
                    false,
                    std::ptr::null_mut(),
                ))
            };
            let (new, old, same) = rows_cx.switch_to(|_| {
                let (new, old) = (next(&new_r), next(&old_r));
                let same = match (skip_unchanged, new, old, carried) {
                    (true, Some(n), Some(o), Some(c)) => unchanged(o, n, desc, c),
                    _ => false,
                };
                let json = |t: pg_sys::HeapTuple| {
                    encoding::to_utf8(tuple_json(t, desc, carried), &what).into_owned()
                };
                if same {
                    (None, None, true)
                } else {
                    (new.map(json), old.map(json), false)
                }
            });
            rows_cx.reset();
            if same {
                continue;
            }
            if new.is_none() && old.is_none() {
                break;
            }
            let row_len = new.as_ref().map_or(4, Vec::len) + old.as_ref().map_or(4, Vec::len);
            if in_message > 0 && buf.len() + row_len > cap {
                event::end_batch(&mut buf, format);
                send(firing, target, format, mode, &mut buf, Key::default());
                buf.clear();
                in_message = 0;
                // Each message is an event of its own, with its own id.
                made = Made::now(format, mode);
            }
            if in_message == 0 {
                let ev = Event {
                    ctx: made.ctx(),
                    ..ev
                };
                event::begin_batch(&mut buf, format, &ev);
            }
            event::push_batch_row(
                &mut buf,
                format,
                in_message == 0,
                new.as_deref(),
                old.as_deref(),
                one_line,
            );
            in_message += 1;
        }
        if in_message > 0 {
            event::end_batch(&mut buf, format);
            send(firing, target, format, mode, &mut buf, Key::default());
        }
        for (_, _, slot) in new_r.iter().chain(old_r.iter()) {
            pg_sys::ExecDropSingleTupleTableSlot(*slot);
        }
    }
}

/// The parsed arguments of `tg`, from the cache or parsed now; bad
/// arguments raise the ERROR that names the trigger and the argument.
fn plan_for(tg: &pg_sys::Trigger, firing: &Firing<'_>) -> Rc<Plan> {
    let func = firing.func;
    if let Some(p) = PLANS.with_borrow(|plans| plans.iter().find(|p| p.matches(tg, func)).cloned())
    {
        return p;
    }
    let n = usize::try_from(tg.tgnargs).unwrap_or(0);
    // SAFETY: tgargs holds tgnargs C strings.
    let ptrs: Vec<_> = (0..n).map(|i| unsafe { *tg.tgargs.add(i) }).collect();
    let raw = ptrs
        .iter()
        // SAFETY: as above.
        .map(|p| unsafe { CStr::from_ptr(*p) }.to_bytes().to_vec())
        .collect();
    let args: Vec<String> = ptrs
        .iter()
        .enumerate()
        // SAFETY: as above.
        .map(|(i, p)| {
            unsafe { encoding::name(*p, &|| format!("trigger argument {}", i + 1)) }.into_owned()
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dest, opts) = func.parse(&refs).unwrap_or_else(|source| {
        EmitError::TriggerArgument {
            trigger: firing.describe(),
            func: func.name(),
            source,
        }
        .raise()
    });
    let plan = Rc::new(Plan {
        tgoid: tg.tgoid,
        func,
        raw,
        args,
        dest,
        opts,
        key_attnums: RefCell::default(),
    });
    PLANS.with_borrow_mut(|plans| {
        plans.retain(|p| p.tgoid != tg.tgoid);
        plans.push(plan.clone());
    });
    plan
}

/// The delivery mode in force; refuses, naming the trigger, a destination
/// that sends later and that the allowlist cannot allow.
fn delivery_mode(firing: &Firing<'_>, dest: &Resolved, opts: &Options) -> Delivery {
    // A channel without delivery= is async whatever the default: only an
    // explicit delivery=sync is refused.
    let mode = match (opts.delivery, dest.target.endpoint()) {
        (None, Destination::Channel(_)) => Delivery::Async,
        (mode, _) => mode.unwrap_or_else(settings::default_delivery),
    };
    let mode = crate::delivery::for_target(&|| firing.describe(), &dest.target, mode);
    if mode != Delivery::Sync {
        let allow = settings::allowlist();
        let checked = dest
            .allowed_under
            .borrow()
            .as_ref()
            .is_some_and(|a| Rc::ptr_eq(a, &allow));
        if !checked {
            crate::delivery::refuse_unless_allowed(&|| firing.describe(), &dest.target);
            *dest.allowed_under.borrow_mut() = Some(allow);
        }
    }
    mode
}
