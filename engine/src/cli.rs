//! CLI building blocks.
