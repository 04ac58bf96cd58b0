//! Buffering a body with a size limit, for replay, fingerprinting and signatures.

use std::fmt;

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::BoxError;

/// Reading a body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The body was larger than the limit; reading stopped at the limit.
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body stream failed.
    Read(BoxError),
}

impl BodyError {
    /// Whether the body was too large: past this read's limit, or past a limit of a layer
    /// outside it (tower-http's `RequestBodyLimitLayer` on a body without a `Content-Length`
    /// fails the read with `http_body_util::LengthLimitError`), which is a 413, not a broken
    /// body.
    pub fn is_too_large(&self) -> bool {
        match self {
            Self::TooLarge { .. } => true,
            Self::Read(e) => crate::find::<http_body_util::LengthLimitError>(&**e).is_some(),
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "body larger than the {limit}-byte limit"),
            // In `describe`'s words: a broken connection's body error ("error reading a body
            // from connection") names its cause only in its source.
            Self::Read(e) => write!(
                f,
                "could not read the body: {}",
                crate::classify::describe(&**e)
            ),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TooLarge { .. } => None,
            Self::Read(e) => Some(&**e),
        }
    }
}

/// Whether the body's size hint proves it fits in `limit` bytes without reading it.
pub fn fits<B: Body>(body: &B, limit: usize) -> bool {
    body.size_hint().upper().is_some_and(|u| u <= limit as u64)
}

/// Reads a whole body into memory, failing with [`BodyError::TooLarge`] as soon as more than
/// `limit` bytes have arrived (nothing more is read).
///
/// # Errors
/// [`BodyError`] when the body is too large or its stream fails.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use sturdy_core::body::{buffer, BodyError};
///
/// let b = buffer(Full::<Bytes>::from("hello"), 16).await.unwrap();
/// assert_eq!(&b[..], b"hello");
/// assert!(matches!(buffer(Full::<Bytes>::from("hello"), 4).await, Err(BodyError::TooLarge { limit: 4 })));
/// # }
/// ```
pub async fn buffer<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(BodyError::TooLarge { limit })
            } else {
                Err(BodyError::Read(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose own text names no cause, as hyper's body error does.
    #[derive(Debug)]
    struct Reading(std::io::Error);

    impl fmt::Display for Reading {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("error reading a body from connection")
        }
    }

    impl std::error::Error for Reading {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_read_error_names_its_cause() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let e = BodyError::Read(Box::new(Reading(reset)));
        assert_eq!(
            e.to_string(),
            "could not read the body: connection reset by peer"
        );
        let own = BodyError::Read("the upload was cancelled".into());
        assert_eq!(
            own.to_string(),
            "could not read the body: the upload was cancelled"
        );
    }
}
