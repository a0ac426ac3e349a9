//! The `easel` binary. The bot (`easel run`, `easel demo`) and the operator
//! commands land with their issues; until then this says so and exits 2.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "easel {}: the bot and operator commands are not built yet; see README.md",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
