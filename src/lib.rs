//! The flotilla binary: CLI, loader.
