//! Stop strings, matched on generated text across token boundaries: text
//! that could still become a stop string is held back, and the stop string
//! itself is never emitted.

#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matched {
    /// Text that is now safe to emit.
    pub emit: String,
    /// A stop string was found; nothing after `emit` may be emitted.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Matched {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return Matched {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let emit = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        Matched {
            emit,
            stopped: false,
        }
    }

    /// Text still held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_across_token_boundaries_is_not_leaked() {
        assert_eq!(
            run(
                &["\n\nUser:"],
                &["Hi", " there", "\n", "\nUs", "er:", " more"]
            ),
            ("Hi there".into(), true)
        );
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        assert_eq!(run(&["END"], &["The E", "ND"]), ("The ".into(), true));
        assert_eq!(run(&["END"], &["The E", "nd"]), ("The End".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        assert_eq!(run(&["b", "ab"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
        assert_eq!(
            run(&["日本"], &["これは日", "本です"]),
            ("これは".into(), true)
        );
    }

    #[test]
    fn held_text_is_emitted_as_soon_as_it_cannot_match() {
        let mut m = StopMatcher::new(["</s>".to_string()]);
        assert_eq!(m.push("a<").emit, "a");
        assert_eq!(m.push("b").emit, "<b");
    }
}
