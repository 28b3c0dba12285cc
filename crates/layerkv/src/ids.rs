//! Identifiers shared by the cache, the step protocol and the errors (a leaf module, so none of
//! them imports another for a name).

/// A sequence id chosen by the engine (a request, a beam, a calibration sample).
pub type SeqId = u64;

/// A request id chosen by the caller of the scheduler; the request runs on the cache sequence
/// with the same id.
pub type RequestId = u64;
