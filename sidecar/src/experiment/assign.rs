//! Randomized assignment in balanced blocks: which class and which arm each request gets.
//!
//! Classes are interleaved in blocks (every class once, in a random order), so each class is spread over
//! the whole run; within a class, arms come in blocks of `block` requests holding every arm equally, in a
//! random order. Neither the scheduler nor drift over time can line up with an arm, and at any moment the
//! arms of a class are at most `block / 2` requests apart. The sequence is a function of the seed alone.

use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub struct Assigner {
    rng: ChaCha8Rng,
    arms: usize,
    block: usize,
    /// The current block of class indices, consumed from the back.
    class_block: Vec<usize>,
    /// Per class, the current block of arm indices, consumed from the back.
    arm_blocks: Vec<Vec<usize>>,
}

impl Assigner {
    /// `block` is a multiple of `arms` (checked by the options).
    pub fn new(seed: u64, classes: usize, arms: usize, block: usize) -> Self {
        Assigner {
            rng: ChaCha8Rng::seed_from_u64(seed),
            arms,
            block: block.max(arms),
            class_block: Vec::new(),
            arm_blocks: vec![Vec::new(); classes],
        }
    }

    /// The next request's (class, arm).
    pub fn next(&mut self) -> (usize, usize) {
        if self.class_block.is_empty() {
            self.class_block = (0..self.arm_blocks.len()).collect();
            self.class_block.shuffle(&mut self.rng);
        }
        let class = self.class_block.pop().unwrap_or(0);
        let Some(arm_block) = self.arm_blocks.get_mut(class) else {
            return (0, 0);
        };
        if arm_block.is_empty() {
            *arm_block = (0..self.block).map(|i| i % self.arms).collect();
            arm_block.shuffle(&mut self.rng);
        }
        (class, arm_block.pop().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_balance_arms_within_each_class_and_spread_classes() {
        let mut assigner = Assigner::new(42, 3, 2, 4);
        let mut counts = [[0i64; 2]; 3];
        for i in 0..1200 {
            let (class, arm) = assigner.next();
            counts[class][arm] += 1;
            // Every class block of 3 requests holds each class once.
            if i % 3 == 2 {
                let per_class: Vec<i64> = counts.iter().map(|c| c[0] + c[1]).collect();
                assert!(
                    per_class.iter().all(|&n| n == per_class[0]),
                    "{per_class:?}"
                );
            }
            for c in &counts {
                assert!((c[0] - c[1]).abs() <= 2, "{counts:?}");
            }
        }
        assert_eq!(counts, [[200, 200]; 3]);
    }

    #[test]
    fn the_sequence_is_the_seeds_and_not_an_alternation() {
        let take = |seed| {
            let mut a = Assigner::new(seed, 1, 2, 4);
            (0..64).map(|_| a.next().1).collect::<Vec<_>>()
        };
        assert_eq!(take(7), take(7));
        assert_ne!(take(7), take(8));
        let alternating: Vec<usize> = (0..64).map(|i| i % 2).collect();
        assert_ne!(take(7), alternating);
    }
}
