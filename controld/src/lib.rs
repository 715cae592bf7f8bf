//! controld: the control processor.

pub mod config;
pub mod maglev;
