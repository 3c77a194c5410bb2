//! Placeholder: filled by the option-parser work.
