//! Typed handlers, routed by message type: a [`TypedHandler`] per type gets each message's
//! body already decoded into its Rust type, and [`Routes`] (a [`Handler`]) sends every message
//! to the handler of its type, keeping the batch's order, with a declared policy for types
//! nobody handles ([`UnknownTypes`]).
//!
//! ```
//! use diesel_async::AsyncPgConnection;
//! use ferrybox::inbox::{HandlerError, ReceivedMessage, Routes, TypedHandler, UnknownTypes};
//!
//! #[derive(serde::Deserialize)]
//! struct AccountOpened { account_id: String }
//!
//! struct Accounts;
//!
//! impl TypedHandler<AccountOpened> for Accounts {
//!     async fn handle(
//!         &self,
//!         _conn: &mut AsyncPgConnection,
//!         _message: &ReceivedMessage,
//!         opened: AccountOpened,
//!     ) -> Result<(), HandlerError> {
//!         let _ = opened.account_id; // write with the connection
//!         Ok(())
//!     }
//! }
//!
//! let handler = Routes::new()
//!     .on("com.example.AccountOpened", Accounts)
//!     .unknown_types(UnknownTypes::Ignore);
//! assert_eq!(handler.message_types().collect::<Vec<_>>(), ["com.example.AccountOpened"]);
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;

use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

use super::handler::{Handler, HandlerError, ReceivedMessage};

/// A handler of one message type, given each message's body decoded into `T` (a body that does
/// not fit `T` is a permanent failure: the message is dead-lettered, never half applied).
pub trait TypedHandler<T>: Send + Sync + 'static {
    /// Applies one message.
    fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
        body: T,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a run of consecutive messages of this type, in order (the batch path; see
    /// [`Handler::handle_batch`]). The default applies them one by one, each in its span.
    fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: Vec<(&ReceivedMessage, T)>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send
    where
        T: Send,
    {
        async move {
            for (message, body) in messages {
                tracing::Instrument::instrument(self.handle(conn, message, body), message.span())
                    .await?;
            }
            Ok(())
        }
    }
}

/// What [`Routes`] does with a message of a type no handler is registered for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownTypes {
    /// A permanent failure: the message is dead-lettered (and its key parked), to redrive once
    /// a handler for it is deployed. The default: nothing is dropped unnoticed.
    #[default]
    DeadLetter,
    /// Applied as a no-op: recorded as seen, nothing written (a consumer that reads only some
    /// of a topic's types).
    Ignore,
}

/// A [`Handler`] that sends each message to the [`TypedHandler`] of its type.
///
/// A batch is split into runs of consecutive messages of one type, each handed to its
/// handler's `handle_batch` in the batch's order, so one key's messages are applied in the
/// order they were published whatever their types.
#[derive(Default)]
pub struct Routes {
    routes: HashMap<String, Box<dyn Route>>,
    unknown: UnknownTypes,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("types", &self.message_types().collect::<Vec<_>>())
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl Routes {
    /// No routes; unknown types are dead-lettered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends messages of `message_type` to `handler`, with their bodies decoded into `T`. A
    /// second handler for the same type replaces the first.
    #[must_use]
    pub fn on<T, H>(mut self, message_type: impl Into<String>, handler: H) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        H: TypedHandler<T>,
    {
        self.routes.insert(
            message_type.into(),
            Box::new(Typed {
                handler,
                body: PhantomData,
            }),
        );
        self
    }

    /// [`Routes::on`] for an [`Event`](crate::Event) type: its own `MESSAGE_TYPE`.
    #[must_use]
    pub fn on_event<E, H>(self, handler: H) -> Self
    where
        E: crate::Event + 'static,
        H: TypedHandler<E>,
    {
        self.on::<E, H>(E::MESSAGE_TYPE, handler)
    }

    /// What to do with messages of types no handler is registered for.
    #[must_use]
    pub fn unknown_types(mut self, policy: UnknownTypes) -> Self {
        self.unknown = policy;
        self
    }

    /// The message types routed, sorted.
    pub fn message_types(&self) -> impl Iterator<Item = &str> {
        let mut types: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        types.sort_unstable();
        types.into_iter()
    }

    /// Checks that the routes and `contract` name the same message types: a type the contract
    /// reads that nothing handles, or a handler for a type the contract does not read (whose
    /// messages the reader schemas would dead-letter), is a configuration error.
    pub fn check_contract(
        &self,
        contract: &crate::contract::ConsumerContract,
    ) -> crate::Result<()> {
        let unhandled: Vec<&String> = contract
            .readers
            .keys()
            .filter(|t| !self.routes.contains_key(*t))
            .collect();
        let unread: Vec<&str> = self
            .message_types()
            .filter(|t| !contract.readers.contains_key(*t))
            .collect();
        if unhandled.is_empty() && unread.is_empty() {
            return Ok(());
        }
        Err(crate::Error::Config(format!(
            "{}'s contract {} and its handlers differ: read but not handled {unhandled:?}, \
             handled but not read {unread:?}",
            contract.consumer,
            contract.path.display()
        )))
    }

    /// Applies a message of `message_type`, which no handler is registered for.
    fn unknown(&self, message_type: &str) -> Result<(), HandlerError> {
        match self.unknown {
            UnknownTypes::DeadLetter => Err(HandlerError::permanent(format!(
                "no handler for message type {message_type}"
            ))),
            UnknownTypes::Ignore => {
                tracing::debug!(message_type, "no handler for this type; ignored");
                Ok(())
            }
        }
    }
}

impl Handler for Routes {
    async fn handle(
        &self,
        conn: &mut AsyncPgConnection,
        message: &ReceivedMessage,
    ) -> Result<(), HandlerError> {
        match self.routes.get(&message.envelope.message_type) {
            Some(route) => route.apply(conn, std::slice::from_ref(&message)).await,
            None => self.unknown(&message.envelope.message_type),
        }
    }

    async fn handle_batch(
        &self,
        conn: &mut AsyncPgConnection,
        messages: &[&ReceivedMessage],
    ) -> Result<(), HandlerError> {
        let mut rest = messages;
        while let Some(first) = rest.first() {
            let message_type = &first.envelope.message_type;
            let run = rest
                .iter()
                .take_while(|m| &m.envelope.message_type == message_type)
                .count();
            match self.routes.get(message_type) {
                Some(route) => route.apply(conn, &rest[..run]).await?,
                None => self.unknown(message_type)?,
            }
            rest = &rest[run..];
        }
        Ok(())
    }
}

/// A typed handler with its body type erased, so handlers of different types share a map.
trait Route: Send + Sync {
    /// Decodes each of `run` (all of one type) and hands them to the handler.
    fn apply<'a>(
        &'a self,
        conn: &'a mut AsyncPgConnection,
        run: &'a [&'a ReceivedMessage],
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct Typed<T, H> {
    handler: H,
    body: PhantomData<fn() -> T>,
}

impl<T, H> Route for Typed<T, H>
where
    T: DeserializeOwned + Send + 'static,
    H: TypedHandler<T>,
{
    fn apply<'a>(
        &'a self,
        conn: &'a mut AsyncPgConnection,
        run: &'a [&'a ReceivedMessage],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let mut decoded = Vec::with_capacity(run.len());
            for message in run {
                decoded.push((*message, message.body::<T>()?));
            }
            if decoded.len() == 1
                && let Some((message, body)) = decoded.pop()
            {
                return tracing::Instrument::instrument(
                    self.handler.handle(conn, message, body),
                    message.span(),
                )
                .await;
            }
            self.handler.handle_batch(conn, decoded).await
        })
    }
}
