//! Interop tests of the composed client and single layers under tower's Buffer, ConcurrencyLimit
//! and Timeout, with cancellation, against the real peers.
