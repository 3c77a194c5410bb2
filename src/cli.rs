//! Placeholder: filled by the CLI work.
