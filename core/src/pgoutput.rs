//! PostgreSQL's logical replication protocol (the `pgoutput` plugin,
//! protocol version 1), as capture reads it from
//! `pg_logical_slot_peek_binary_changes`: one message per row of that
//! function. Only what capture needs is decoded; everything else (origins,
//! types, logical messages) is [`Message::Other`].
//!
//! Reference: PostgreSQL's "Logical Replication Message Formats".

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// A TOASTed value the UPDATE did not change: not in the WAL, so not
    /// known here.
    Unchanged,
    /// The type's text output.
    Text(&'a [u8]),
}

/// A relation as the stream describes it before its first change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub relid: u32,
    pub schema: String,
    pub table: String,
    /// `d` (default: the primary key), `n` (nothing), `f` (full: every
    /// column, so the "key" is the whole old row) or `i` (an index).
    pub identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    /// Part of the replica identity (the primary key by default).
    pub key: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        /// Where the transaction's commit record starts.
        final_lsn: u64,
        /// Microseconds since 2000-01-01.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        /// Past the commit record.
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        relid: u32,
        new: Vec<Value<'a>>,
    },
    /// `old` is the replica identity's columns (`key`, other columns
    /// `Null`) or the whole old row (`REPLICA IDENTITY FULL`), when the
    /// WAL has it.
    Update {
        relid: u32,
        old: Option<Vec<Value<'a>>>,
        new: Vec<Value<'a>>,
    },
    Delete {
        relid: u32,
        old: Vec<Value<'a>>,
    },
    Truncate {
        relids: Vec<u32>,
    },
    Other(u8),
}

/// A message that does not parse: the stream is not what this code
/// speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(format!(
                "{n} bytes wanted, {} left",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, Malformed> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn i32(&mut self) -> Result<i32, Malformed> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, Malformed> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Malformed("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value<'a>>, Malformed> {
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| Malformed(format!("{n} columns")))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    let len =
                        usize::try_from(len).map_err(|_| Malformed(format!("length {len}")))?;
                    Value::Text(self.take(len)?)
                }
                k => return Err(Malformed(format!("column kind {:?}", k as char))),
            });
        }
        Ok(out)
    }
}

/// Parses one message.
pub fn parse(buf: &[u8]) -> Result<Message<'_>, Malformed> {
    let mut r = Reader { buf };
    let m = match r.u8()? {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.u64()? as i64,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            Message::Commit { end_lsn: r.u64()? }
        }
        b'R' => {
            let relid = r.u32()?;
            let schema = r.string()?;
            let table = r.string()?;
            let identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::new();
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    name: r.string()?,
                    type_oid: r.u32()?,
                    typmod: r.i32()?,
                    key: flags & 1 != 0,
                });
            }
            Message::Relation(Relation {
                relid,
                schema,
                table,
                identity,
                columns,
            })
        }
        b'I' => {
            let relid = r.u32()?;
            expect(&mut r, b'N')?;
            Message::Insert {
                relid,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relid = r.u32()?;
            let old = match r.u8()? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    expect(&mut r, b'N')?;
                    Some(old)
                }
                b'N' => None,
                k => return Err(Malformed(format!("update part {:?}", k as char))),
            };
            Message::Update {
                relid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relid = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => {}
                k => return Err(Malformed(format!("delete part {:?}", k as char))),
            }
            Message::Delete {
                relid,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut relids = Vec::new();
            for _ in 0..n.max(0) {
                relids.push(r.u32()?);
            }
            Message::Truncate { relids }
        }
        other => Message::Other(other),
    };
    Ok(m)
}

fn expect(r: &mut Reader<'_>, want: u8) -> Result<(), Malformed> {
    match r.u8()? {
        k if k == want => Ok(()),
        k => Err(Malformed(format!(
            "{:?} where {:?} belongs",
            k as char, want as char
        ))),
    }
}

/// A decimal LSN as PostgreSQL writes one (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses PostgreSQL's `pg_lsn` text.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(b'n'),
                Some("\u{0}") => b.push(b'u'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn begin_commit() {
        let mut b = vec![b'B'];
        b.extend(0x1_0000_0010u64.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(742u32.to_be_bytes());
        assert_eq!(
            parse(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 5,
                xid: 742
            }
        );
        let mut c = vec![b'C', 0];
        c.extend(1u64.to_be_bytes());
        c.extend(2u64.to_be_bytes());
        c.extend(3u64.to_be_bytes());
        assert_eq!(parse(&c).unwrap(), Message::Commit { end_lsn: 2 });
    }

    #[test]
    fn relation_and_changes() {
        let mut r = vec![b'R'];
        r.extend(16384u32.to_be_bytes());
        r.extend(b"public\0orders\0d");
        r.extend(2i16.to_be_bytes());
        r.push(1);
        r.extend(b"id\0");
        r.extend(23u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        r.push(0);
        r.extend(b"note\0");
        r.extend(25u32.to_be_bytes());
        r.extend((-1i32).to_be_bytes());
        let Message::Relation(rel) = parse(&r).unwrap() else {
            panic!()
        };
        assert_eq!(
            (rel.schema.as_str(), rel.table.as_str()),
            ("public", "orders")
        );
        assert_eq!(rel.identity, b'd');
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_oid, 25);

        let mut i = vec![b'I'];
        i.extend(16384u32.to_be_bytes());
        i.push(b'N');
        i.extend(tuple(&[Some("1"), None]));
        assert_eq!(
            parse(&i).unwrap(),
            Message::Insert {
                relid: 16384,
                new: vec![Value::Text(b"1"), Value::Null]
            }
        );

        let mut u = vec![b'U'];
        u.extend(16384u32.to_be_bytes());
        u.push(b'K');
        u.extend(tuple(&[Some("1"), None]));
        u.push(b'N');
        u.extend(tuple(&[Some("2"), Some("\u{0}")]));
        assert_eq!(
            parse(&u).unwrap(),
            Message::Update {
                relid: 16384,
                old: Some(vec![Value::Text(b"1"), Value::Null]),
                new: vec![Value::Text(b"2"), Value::Unchanged]
            }
        );

        let mut d = vec![b'D'];
        d.extend(16384u32.to_be_bytes());
        d.push(b'O');
        d.extend(tuple(&[Some("2"), Some("x")]));
        assert!(matches!(
            parse(&d).unwrap(),
            Message::Delete { relid: 16384, .. }
        ));

        let mut t = vec![b'T'];
        t.extend(2i32.to_be_bytes());
        t.push(0);
        t.extend(1u32.to_be_bytes());
        t.extend(2u32.to_be_bytes());
        assert_eq!(parse(&t).unwrap(), Message::Truncate { relids: vec![1, 2] });
    }

    #[test]
    fn truncated_and_unknown_input_is_an_error_or_other() {
        assert!(parse(b"").is_err());
        assert!(parse(b"B\0\0").is_err());
        let mut i = vec![b'I'];
        i.extend(1u32.to_be_bytes());
        i.push(b'N');
        i.extend(1i16.to_be_bytes());
        i.push(b't');
        i.extend(100i32.to_be_bytes());
        i.extend(b"short");
        assert!(parse(&i).is_err());
        assert_eq!(parse(b"Y").unwrap(), Message::Other(b'Y'));
    }

    #[test]
    fn lsn_round_trip() {
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nope"), None);
    }
}
