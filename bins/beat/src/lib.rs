//! `taskstack-beat`: publishes the configured periodic tasks; run several
//! for availability, exactly one leads. The command line is a library so
//! the multi-call `taskstack` binary runs the very same code.

pub mod cli;
