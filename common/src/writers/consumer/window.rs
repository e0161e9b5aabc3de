//! How much a writer lets RabbitMQ hand it at once, and which returned messages it takes alone.
//!
//! RabbitMQ bounds a consumer's unacked messages by a count of *messages*, but a packed message
//! holds up to [`MAX_PACKED`](crate::message::MAX_PACKED) records. The writer's prefetch is a
//! bound in *records*: the window (the `basic.qos` count its consumer is opened with) is the
//! prefetch divided by the records per message it sees, and the consumer re-subscribes with a
//! new window when the messages it receives grow or shrink.
//!
//! A message RabbitMQ returned at least [`SUSPECT_AFTER`] times (its `x-delivery-count`) is
//! *suspect*: two sessions ended while it was in hand without storing it. It may be one that
//! crashes its writer, so the writer takes it alone, with a window of one: should it crash the
//! writer again, no healthy neighbour is in hand to be returned with it, and only the suspect's
//! own count rises towards the queue's `x-delivery-limit`.

/// Deliveries at which a returned message is taken alone (its `x-delivery-count`).
pub const SUSPECT_AFTER: u64 = 2;

/// The window for a prefetch of records, as the consumer adapts it.
#[derive(Debug, Clone)]
pub struct Window {
    /// The bound, in records.
    records: u32,
    /// Records per message, as recent batches showed them (the largest, decaying slowly).
    pack: usize,
    /// Taking suspect messages, one at a time.
    suspect: bool,
    /// The window the open consumer was given.
    open: Option<u16>,
}

impl Window {
    /// A window for `records` records in hand, assuming one record per message until the
    /// first batch says otherwise.
    pub fn new(records: u32) -> Self {
        Self {
            records: records.max(1),
            pack: 1,
            suspect: false,
            open: None,
        }
    }

    /// The count a consumer opened now is to be given.
    pub fn wanted(&self) -> u16 {
        if self.suspect {
            return 1;
        }
        let count = self.records as usize / self.pack.max(1);
        count.clamp(1, usize::from(u16::MAX)) as u16
    }

    /// Records that the consumer takes in one batch at most: the prefetch, so a batch after a
    /// session end holds everything the last session returned.
    pub fn records(&self) -> usize {
        self.records as usize
    }

    /// A consumer was opened with [`wanted`](Self::wanted).
    pub fn opened(&mut self) -> u16 {
        let count = self.wanted();
        self.open = Some(count);
        count
    }

    /// The consumer is closed (cancelled or its session ended).
    pub fn closed(&mut self) {
        self.open = None;
    }

    /// A new session starts with a window of one until its first message shows it is not a
    /// suspect: what the last session returned comes first, and one that crashed the writer
    /// must not take a window of healthy messages down with it again.
    pub fn careful(&mut self) {
        self.open = None;
        self.suspect = true;
    }

    /// Takes note of a batch: the most records one of its messages held, and whether it was
    /// a suspect taken alone.
    pub fn saw(&mut self, largest: usize, suspect: bool) {
        // Up at once (the bound holds), down by a quarter a batch (no flapping between sizes).
        self.pack = largest.max(1).max(self.pack - self.pack / 4);
        self.suspect = suspect;
    }

    /// Whether the open consumer's window is wrong enough to re-subscribe: it lets RabbitMQ hand
    /// over more records than the bound (a suspect wants a window of one), or a quarter or less
    /// of what the bound allows.
    pub fn should_resubscribe(&self) -> bool {
        let Some(open) = self.open else {
            return false;
        };
        let wanted = self.wanted();
        wanted < open || wanted / 4 >= open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacked_messages_get_the_prefetch_as_window() {
        let mut window = Window::new(2000);
        assert_eq!(window.opened(), 2000);
        window.saw(1, false);
        assert!(!window.should_resubscribe());
    }

    #[test]
    fn packed_messages_shrink_the_window_at_once_and_grow_it_back_slowly() {
        let mut window = Window::new(2000);
        window.opened();
        window.saw(100, false);
        assert!(window.should_resubscribe(), "2 000 messages of 100 records");
        assert_eq!(window.opened(), 20);
        // Packs of 60 to 100 do not make it flap.
        for largest in [60, 100, 70, 90, 60] {
            window.saw(largest, false);
            assert!(!window.should_resubscribe(), "after a batch of {largest}");
        }
        // Unpacked again: the window grows back once the estimate fell to a quarter.
        let mut batches = 0;
        while !window.should_resubscribe() {
            window.saw(1, false);
            batches += 1;
            assert!(batches < 20, "the window never grows back");
        }
        assert!(window.opened() >= 80);
    }

    /// After a batch without suspects the window opens again at its `full` size.
    fn a_healthy_batch_reopens_it(window: &mut Window, full: u16) {
        window.saw(1, false);
        assert!(window.should_resubscribe());
        assert_eq!(window.opened(), full);
    }

    #[test]
    fn a_suspect_is_taken_with_a_window_of_one_and_the_window_comes_back_after() {
        let mut window = Window::new(2000);
        window.opened();
        window.saw(1, true);
        assert!(window.should_resubscribe());
        assert_eq!(window.opened(), 1);
        window.saw(1, true);
        assert!(!window.should_resubscribe(), "still suspects");
        a_healthy_batch_reopens_it(&mut window, 2000);
    }

    #[test]
    fn a_session_starts_with_a_window_of_one() {
        let mut window = Window::new(2000);
        window.careful();
        assert_eq!(window.opened(), 1);
        a_healthy_batch_reopens_it(&mut window, 2000);
    }

    #[test]
    fn the_window_is_never_zero_nor_past_what_amqp_can_say() {
        let mut window = Window::new(10);
        window.saw(10_000, false);
        assert_eq!(window.wanted(), 1);
        assert_eq!(Window::new(u32::MAX).wanted(), u16::MAX);
    }
}
