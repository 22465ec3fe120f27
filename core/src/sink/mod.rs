//! Sinks that speak a broker's own protocol: Redis Streams, NATS JetStream
//! and Kafka. Each is one module whose target type implements [`Broker`]:
//! its URL, the stored-destination options it takes, its connection and how
//! it sends a run of events. Everything else (destinations, the worker's
//! jobs, sync and commit delivery) goes through [`AnyBroker`], which only
//! delegates, so a new broker is one module, one line in the `brokers!`
//! list at the end of this file, and its tests.
//!
//! The brokers' sockets are pg_emit's own TCP transport
//! ([`crate::transport::tcp`]): every connection goes through the same
//! allowlist check of the resolved address, the same timeouts and the same
//! cancellation as TCP and HTTP destinations.

pub mod kafka;
pub mod nats;
mod nkey;
pub mod redis;

use crate::options::OptionError;
use crate::security::Allowlist;
use crate::transport::tcp::SendError;
use crate::transport::tls;
use crate::transport::{Interrupt, Timeouts};
use std::any::Any;

/// One event as a broker takes it.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// The event's id: a consumer's de-duplication key (Redis field `id`,
    /// `Nats-Msg-Id`, Kafka header `id`).
    pub id: &'a str,
    /// Its ordering key (Kafka partitions by it).
    pub key: Option<i64>,
    /// Its key as the destination carries it, where the destination asks
    /// for one ([`Broker::record_keys`]): a row's key columns as a JSON
    /// object, or a message's key as given.
    pub record_key: Option<&'a str>,
    /// The event's bytes.
    pub body: &'a [u8],
    /// Its media type (Kafka header `content-type`).
    pub content_type: &'a str,
}

/// What a stored destination's options may give a broker beyond its URL;
/// which of them a broker takes is its [`Broker::OPTIONS`].
#[derive(Default)]
pub struct Settings<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    pub token: Option<&'a str>,
    /// NATS: an NKey user's seed.
    pub nkey_seed: Option<&'a str>,
    /// NATS: a `.creds` file's text (a user JWT and its seed).
    pub creds: Option<&'a str>,
    pub maxlen: Option<u64>,
    /// Kafka: `plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`.
    pub security_protocol: Option<&'a str>,
    pub sasl_mechanism: Option<&'a str>,
    /// NATS: TLS before anything else.
    pub tls_first: bool,
    /// Kafka: `none`, `gzip`, `snappy`, `lz4`, `zstd`.
    pub compression: Option<&'a str>,
    /// Kafka: `hash` or `columns` (see [`Broker::record_keys`]).
    pub record_key: Option<&'a str>,
    /// `ca_file`, `cert_file`, `key_file`, `server_name`.
    pub tls: tls::Options,
}

/// The stored options of a broker that speaks TLS.
pub const TLS_OPTIONS: [&str; 4] = ["ca_file", "cert_file", "key_file", "server_name"];

/// What stopped a broker client: the network, as for every destination,
/// or the broker itself, in its words.
pub trait BrokerError: std::fmt::Display {
    fn network(self) -> Result<SendError, String>;
}

/// Why a broker send stopped, in the words every caller shares.
#[derive(Debug)]
pub enum Stopped {
    Network(SendError),
    /// What the broker said (never a credential: brokers' errors name
    /// the command, not the secret).
    Broker(String),
}

/// A broker sink's target: a stream, subject or topic on a server.
pub trait Broker: Sized {
    /// Its URL scheme (`redis`, ...).
    const SCHEME: &'static str;
    /// The scheme of its URLs over TLS (`rediss`), if TLS has one.
    const TLS_SCHEME: Option<&'static str> = None;
    /// The port when a URL names none.
    const PORT: u16;
    /// The form of its URL, for errors.
    const FORM: &'static str;
    /// The stored-destination options it takes (`username`, `password`,
    /// `token`, `maxlen`); any other is refused at `create_destination`.
    const OPTIONS: &'static [&'static str];
    /// Whether it routes by events' ordering keys ([`Item::key`]), which
    /// sync and commit triggers then compute as async ones always do.
    const KEYED: bool = false;
    /// What a sender keeps between sends.
    type Conn: Send + 'static;
    type Error: BrokerError;

    /// From a URL whose host is checked and that carries no credentials;
    /// `None` when the rest of it does not have the form [`Self::FORM`]
    /// (an `Err` explains something more specific).
    fn from_url(u: &url::Url, host: String) -> Result<Option<Self>, String>;

    /// Whether its URL asks for TLS ([`Self::TLS_SCHEME`]).
    fn tls(&self) -> bool {
        false
    }

    /// Whether events carry their key as text for it ([`Item::record_key`]):
    /// worked out where they are made (a row's key columns as JSON), and
    /// kept with them until they are sent.
    fn record_keys(&self) -> bool {
        false
    }

    /// Its TLS options, when it has any.
    fn tls_options(&self) -> Option<&tls::Options> {
        None
    }

    /// Takes the further servers of a URL that names several
    /// (`kafka://h1:9092,h2:9092/topic`), with their ports if given;
    /// brokers reached at one address refuse them.
    fn also(&mut self, _servers: Vec<(String, Option<u16>)>) -> Result<(), String> {
        Err("name one server".into())
    }

    /// Its URL without credentials: shown in `emit.stats` and kept in the
    /// outbox, from which [`AnyBroker::parse`] reads it back.
    fn url(&self) -> String;

    /// The server it connects to.
    fn address(&self) -> (&str, u16);

    /// Takes a stored destination's options (only those in
    /// [`Self::OPTIONS`] are set).
    fn configure(&mut self, s: &Settings<'_>) -> Result<(), String>;

    /// Sends `items` in order on the connection kept in `conn` (opened when
    /// there is none, or when it was opened for another server or other
    /// credentials). Returns how many the broker acknowledged (a prefix)
    /// and what stopped the rest; after a failure the connection is
    /// dropped, so the next call starts clean.
    fn send(
        &self,
        conn: &mut Option<Self::Conn>,
        items: &[Item<'_>],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> (usize, Result<(), Self::Error>);
}

/// A sender's kept broker connection, of whichever broker it last sent to.
#[derive(Default)]
pub struct Connection(Option<Box<dyn Any + Send>>);

impl Connection {
    /// The slot for `C`, emptied first if it held another broker's.
    fn slot<C: Send + 'static>(&mut self) -> &mut Option<C> {
        if !self.0.as_ref().is_some_and(|b| b.is::<Option<C>>()) {
            self.0 = Some(Box::new(None::<C>));
        }
        self.0
            .as_mut()
            .and_then(|b| b.downcast_mut::<Option<C>>())
            .expect("just made of this type")
    }
}

/// Sends through `b` on `conn`, its errors in [`Stopped`]'s words.
fn send_as<B: Broker>(
    b: &B,
    conn: &mut Connection,
    items: &[Item<'_>],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> (usize, Result<(), Stopped>) {
    let (n, r) = b.send(conn.slot(), items, timeouts, allow, intr);
    (
        n,
        r.map_err(|e| match e.network() {
            Ok(s) => Stopped::Network(s),
            Err(m) => Stopped::Broker(m),
        }),
    )
}

fn parse_as<B: Broker>(u: &url::Url, host: String, input: &str) -> Result<B, OptionError> {
    let bad = |why: &str| OptionError::Destination(format!("{input:?}: {why}"));
    match B::from_url(u, host) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(bad(B::FORM)),
        Err(why) => Err(bad(&why)),
    }
}

/// The list of brokers: one line each, `Variant(module::Type)`.
macro_rules! brokers {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// One of the brokers, delegating to its [`Broker`] implementation.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum AnyBroker {
            $($variant(Box<$ty>)),*
        }

        impl AnyBroker {
            /// Whether `scheme` is a broker's (with or without TLS).
            pub fn is_scheme(scheme: &str) -> bool {
                $(if scheme == <$ty as Broker>::SCHEME
                    || Some(scheme) == <$ty as Broker>::TLS_SCHEME
                {
                    return true;
                })*
                false
            }

            /// The broker of `scheme`, from a URL whose host is checked
            /// and that carries no credentials.
            pub fn parse(
                scheme: &str,
                u: &url::Url,
                host: String,
                input: &str,
            ) -> Option<Result<AnyBroker, OptionError>> {
                $(if scheme == <$ty as Broker>::SCHEME
                    || Some(scheme) == <$ty as Broker>::TLS_SCHEME
                {
                    return Some(
                        parse_as::<$ty>(u, host, input).map(|b| AnyBroker::$variant(Box::new(b))),
                    );
                })*
                None
            }

            /// The schemes of the brokers that take the stored option `name`.
            pub fn taking(name: &str) -> Vec<&'static str> {
                let mut v = Vec::new();
                $(if <$ty as Broker>::OPTIONS.contains(&name) {
                    v.push(<$ty as Broker>::SCHEME);
                })*
                v
            }

            /// Its URL's scheme: the TLS one when it asks for TLS.
            pub fn scheme(&self) -> &'static str {
                match self {
                    $(AnyBroker::$variant(b) => match (b.tls(), <$ty as Broker>::TLS_SCHEME) {
                        (true, Some(s)) => s,
                        _ => <$ty as Broker>::SCHEME,
                    }),*
                }
            }

            /// Whether it takes the stored option `name`.
            pub fn takes(&self, name: &str) -> bool {
                match self {
                    $(AnyBroker::$variant(_) => <$ty as Broker>::OPTIONS.contains(&name)),*
                }
            }

            /// See [`Broker::KEYED`].
            pub fn keyed(&self) -> bool {
                match self {
                    $(AnyBroker::$variant(_) => <$ty as Broker>::KEYED),*
                }
            }

            /// See [`Broker::record_keys`].
            pub fn record_keys(&self) -> bool {
                match self {
                    $(AnyBroker::$variant(b) => b.record_keys()),*
                }
            }

            /// See [`Broker::tls_options`].
            pub fn tls_options(&self) -> Option<&tls::Options> {
                match self {
                    $(AnyBroker::$variant(b) => b.tls_options()),*
                }
            }

            /// See [`Broker::also`].
            pub fn also(&mut self, servers: Vec<(String, Option<u16>)>) -> Result<(), String> {
                match self {
                    $(AnyBroker::$variant(b) => b.also(servers)),*
                }
            }

            pub fn url(&self) -> String {
                match self {
                    $(AnyBroker::$variant(b) => b.url()),*
                }
            }

            pub fn address(&self) -> (&str, u16) {
                match self {
                    $(AnyBroker::$variant(b) => b.address()),*
                }
            }

            pub fn configure(&mut self, s: &Settings<'_>) -> Result<(), OptionError> {
                match self {
                    $(AnyBroker::$variant(b) => b.configure(s)),*
                }
                .map_err(|e| OptionError::Destination(format!("options: {e}")))
            }

            /// See [`Broker::send`].
            pub fn send(
                &self,
                conn: &mut Connection,
                items: &[Item<'_>],
                timeouts: &Timeouts,
                allow: &Allowlist,
                intr: &dyn Interrupt,
            ) -> (usize, Result<(), Stopped>) {
                match self {
                    $(AnyBroker::$variant(b) => send_as(b.as_ref(), conn, items, timeouts, allow, intr)),*
                }
            }
        }
    };
}

brokers! {
    Redis(redis::Stream),
    Nats(nats::Subject),
    Kafka(kafka::Topic),
}
