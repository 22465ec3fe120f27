//! Routing by table: a broker URL whose stream, subject or topic names
//! `{schema}` and `{table}` (`kafka://h:9092/cdc.{schema}.{table}`, as
//! Debezium names its topics) is filled in by each row trigger with its
//! table's names. Each table's events then go to a destination of their
//! own (their own stream of ids, order and `emit.stats` row): a URL's
//! filled-in URL, or a stored destination's name with the table after an
//! `@` (`cdc@public.orders`), which the worker fills in again from the
//! stored URL, so credentials still never enter the outbox.

use crate::cloudevents::percent_encode_path;

const SCHEMA: &str = "{schema}";
const TABLE: &str = "{table}";

/// Whether a URL routes by table.
pub fn is_template(url: &str) -> bool {
    url.contains(SCHEMA) || url.contains(TABLE)
}

/// The template's URL for one table: the names percent-encoded as a path
/// segment writes them (a broker then refuses what its names cannot hold,
/// a Kafka topic with a space, say).
pub fn fill(template: &str, schema: &str, table: &str) -> String {
    let enc = |s: &str| {
        let mut out = Vec::new();
        percent_encode_path(&mut out, s);
        String::from_utf8(out).expect("percent-encoding leaves ASCII")
    };
    template
        .replace(SCHEMA, &enc(schema))
        .replace(TABLE, &enc(table))
}

/// A routed stored destination's key: its name, `@`, and the table
/// (`.`, `@` and `%` in the names percent-encoded, so it splits back).
pub fn key(name: &str, schema: &str, table: &str) -> String {
    let enc = |s: &str| {
        s.replace('%', "%25")
            .replace('.', "%2E")
            .replace('@', "%40")
    };
    format!("{name}@{}.{}", enc(schema), enc(table))
}

/// A destination key's stored name and, if it is routed, its schema and
/// table (see [`key`]).
pub fn split(key: &str) -> (&str, Option<(String, String)>) {
    let Some((name, route)) = key.split_once('@') else {
        return (key, None);
    };
    // One pass: each %XX is the byte it stands for.
    let dec = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let byte = (b[i] == b'%')
                .then(|| std::str::from_utf8(b.get(i + 1..i + 3)?).ok())
                .flatten()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(v) => {
                    out.push(v);
                    i += 3;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    match route.split_once('.') {
        Some((schema, table)) => (name, Some((dec(schema), dec(table)))),
        None => (key, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_and_keys_split() {
        assert!(is_template("kafka://h/cdc.{schema}.{table}"));
        assert!(!is_template("kafka://h/cdc"));
        assert_eq!(
            fill("kafka://h/cdc.{schema}.{table}", "public", "order items"),
            "kafka://h/cdc.public.order%20items"
        );
        for (schema, table) in [
            ("public", "orders"),
            ("a.b@c%", "x.y"),
            ("s", ""),
            ("%2E", "%40"),
        ] {
            let k = key("cdc", schema, table);
            assert_eq!(
                split(&k),
                ("cdc", Some((schema.to_string(), table.to_string()))),
                "{k}"
            );
        }
        assert_eq!(split("cdc"), ("cdc", None));
    }
}
