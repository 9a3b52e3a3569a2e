//! The isla microVM monitor.
