//! The injection decision (pure). Filled in by the webhook work.
