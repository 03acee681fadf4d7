//! Delivering a cancel request, and how long a delivery takes.
//!
//! A client that cancels waits for its cancel connection to close before
//! it sends its next command (libpq's `PQcancel` does), and PostgreSQL
//! closes that connection only once it has signalled the backend. So the
//! close is the client's receipt: closed earlier, the signal can land on
//! the command sent after it. rolegate therefore holds the client's cancel
//! connection open until the server, the fleet peer or the other process
//! of a restart that it passed the request to has closed its own, each
//! waiting in turn on the next hop, and closes the client's last.
//!
//! A key that matches nothing closes after about as long as a delivery
//! takes here ([`DeliveryTime`]), so that the close's timing says little
//! about whether a guessed key was right.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most a miss is held: the typical delivery is a loopback or LAN
/// round trip or two, and a miss holds a connection (and its source's
/// place in the throttle) while it waits.
pub(super) const MAX_MISS_HOLD: Duration = Duration::from_millis(250);
/// The first estimate, before any delivery was measured: a connect and a
/// close on a LAN.
const FIRST_ESTIMATE: Duration = Duration::from_millis(1);
/// The weight of a new measurement in the running estimate: 1/8.
const WEIGHT_SHIFT: u32 = 3;
/// The most bytes read from a far end while waiting for its close (it
/// should send none).
const MAX_DRAIN: usize = 4096;

/// Writes `request` and waits for the far end to close the connection,
/// the sign that it has acted on the request. Bytes it sends meanwhile are
/// read and dropped (a bounded number); a reset after the request was
/// written counts as the close. The caller bounds the time.
pub async fn deliver<S>(stream: &mut S, request: &[u8]) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut sink = [0u8; 256];
    let mut drained = 0;
    loop {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => {
                drained += n;
                if drained > MAX_DRAIN {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the far end answered a cancel request with data instead of closing",
                    ));
                }
            }
        }
    }
}

/// A running estimate of how long a delivered cancel took, start to
/// close. Shared by every cancel of the process; updated without a lock.
pub struct DeliveryTime {
    micros: AtomicU64,
}

impl Default for DeliveryTime {
    fn default() -> Self {
        Self {
            micros: AtomicU64::new(FIRST_ESTIMATE.as_micros() as u64),
        }
    }
}

impl DeliveryTime {
    /// Takes in one delivery's duration. Two deliveries at once may lose
    /// one of their updates; an estimate needs no more.
    pub fn record(&self, took: Duration) {
        let sample = took.min(MAX_MISS_HOLD).as_micros() as u64;
        let old = self.micros.load(Ordering::Relaxed);
        let new = old - (old >> WEIGHT_SHIFT) + (sample >> WEIGHT_SHIFT);
        self.micros.store(new, Ordering::Relaxed);
    }

    /// How long a miss should take, start to close.
    pub fn typical(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed)).min(MAX_MISS_HOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn delivery_waits_for_the_far_end_to_close() {
        let (mut near, mut far) = duplex(1024);
        let far_end = tokio::spawn(async move {
            let mut request = [0u8; 3];
            far.read_exact(&mut request).await.expect("read");
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(far);
            request
        });
        let started = std::time::Instant::now();
        deliver(&mut near, b"abc").await.expect("delivered");
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "returned before the close"
        );
        assert_eq!(&far_end.await.expect("far end"), b"abc");
    }

    #[tokio::test]
    async fn a_far_end_that_streams_data_is_refused() {
        let (mut near, mut far) = duplex(64 * 1024);
        far.write_all(&[0u8; MAX_DRAIN + 1]).await.expect("write");
        assert!(deliver(&mut near, b"abc").await.is_err());
    }

    #[test]
    fn the_estimate_follows_deliveries_within_bounds() {
        let time = DeliveryTime::default();
        assert_eq!(time.typical(), FIRST_ESTIMATE);
        for _ in 0..100 {
            time.record(Duration::from_millis(8));
        }
        let typical = time.typical();
        assert!(
            typical > Duration::from_millis(7) && typical <= Duration::from_millis(8),
            "{typical:?}"
        );
        for _ in 0..100 {
            time.record(Duration::from_secs(30));
        }
        let typical = time.typical();
        assert!(
            typical > Duration::from_millis(240) && typical <= MAX_MISS_HOLD,
            "{typical:?}"
        );
    }
}
