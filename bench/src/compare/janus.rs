//! The `janus` target of `relay-bench compare`.

use std::path::Path;

use crate::run::report::Report;
use crate::run::{RunArgs, RunError};

/// Runs the load of `args` through Janus's VideoRoom plugin.
pub async fn run(_args: &RunArgs, _janus_bin: &Path) -> Result<Report, RunError> {
    Err(RunError::Options("the janus target is not built yet".into()))
}
