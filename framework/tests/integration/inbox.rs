use crate::support::Fixture;
