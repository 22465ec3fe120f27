//! Reading a cursor's rows a batch at a time, in memory that does not grow
//! with the rows read.
//!
//! pgrx's getters copy a `bytea` or text value into the memory context
//! that was current before `SPI_connect`, which lives until the whole read
//! ends, and leave every fetched batch to `SPI_finish`: read that way, a
//! cursor over millions of rows holds them all (a captured transaction of
//! a million small rows cost the worker 150 MB). Here each batch's values
//! are read in place, and the batch, with whatever was made from it, is
//! freed before the next.

use pgrx::pg_sys;
use pgrx::spi::{SpiCursor, SpiError};
use pgrx::PgMemoryContexts;

/// The rows one fetch returned.
pub struct Batch {
    table: *mut pg_sys::SPITupleTable,
    len: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Column `col` (from 1) of row `row`, as it is; pointers in it live
    /// until the batch is freed.
    pub fn datum(&self, row: usize, col: i32) -> Option<pg_sys::Datum> {
        assert!(row < self.len, "row {row} of a batch of {}", self.len);
        // SAFETY: `table` is the fetch's own, not yet freed, and has `len`
        // rows (SPI_getbinval checks `col`).
        unsafe {
            let tuple = *(*self.table).vals.add(row);
            let mut null = false;
            let datum = pg_sys::SPI_getbinval(tuple, (*self.table).tupdesc, col, &mut null);
            (!null).then_some(datum)
        }
    }

    /// Column `col` (from 1) of row `row` as bytes: the column must be
    /// `bytea` or text. They live until the batch is freed.
    pub fn bytes(&self, row: usize, col: i32) -> Option<&[u8]> {
        // SAFETY: the table's own descriptor.
        let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked((*self.table).tupdesc) };
        let varlena = desc.get(col as usize - 1).is_some_and(|a| a.attlen == -1);
        assert!(varlena, "column {col} of a batch is not bytea or text");
        let datum = self.datum(row, col)?;
        // SAFETY: a varlena of the table; a compressed or out-of-line one
        // is expanded into the batch's memory context (see `each`).
        unsafe {
            let value = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
            Some(pgrx::varlena::varlena_to_byte_slice(value))
        }
    }
}

/// Fetches `cursor` `per` rows at a time until it ends, running `f` on each
/// batch in a memory context that is reset after it, then freeing the
/// batch. Nothing `f` allocates in the current memory context may outlive
/// its call.
pub fn each<E: From<SpiError>>(
    cursor: &mut SpiCursor<'_>,
    per: i64,
    mut f: impl FnMut(&Batch) -> Result<(), E>,
) -> Result<(), E> {
    let mut memory = PgMemoryContexts::new("pg_emit batch");
    loop {
        let len = cursor.fetch(per)?.len();
        if len == 0 {
            return Ok(());
        }
        // Taken now: SPI (an outbox write in `f`) replaces the global, and
        // restores it when it finishes.
        // SAFETY: the table the fetch just made.
        let batch = Batch {
            table: unsafe { pg_sys::SPI_tuptable },
            len,
        };
        // SAFETY: nothing allocated in `memory` outlives `f`, and the
        // batch's values are not used after it.
        unsafe {
            memory.switch_to(|_| f(&batch))?;
            memory.reset();
            pg_sys::SPI_freetuptable(batch.table);
        }
    }
}
