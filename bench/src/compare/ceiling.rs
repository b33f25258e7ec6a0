//! The `udp-ceiling` target of `relay-bench compare`.

use crate::run::report::Report;
use crate::run::{RunArgs, RunError};

/// Runs the load of `args` through the bench's plain UDP fan-out forwarder.
pub async fn run(_args: &RunArgs) -> Result<Report, RunError> {
    Err(RunError::Options("the udp-ceiling target is not built yet".into()))
}
