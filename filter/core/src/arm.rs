//! The identity of a configured arm, shared by every part of the core (a leaf: it imports nothing).

/// Index of a configured arm (in configuration order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArmId(pub usize);
