//! Compatibility levels and checks: the framework's, so the registry and `make contracts`
//! judge a change the same way.

pub use ferrybox::contract::Level;
