//! PyramidKV's per-layer budget schedule: lower layers keep more tokens, upper layers fewer,
//! with the same average.
//!
//! With an average budget `B`, an observation window `w` and a steepness `beta`, the top layer
//! keeps `w + (B - w) / beta` tokens and the bottom layer `w + 2 (B - w) - (B - w) / beta`,
//! linearly in between (as in the PyramidKV reference code). O(groups).

use crate::error::{Error, Result};

/// Budgets (tokens kept, window included) for `num_groups` groups ordered bottom to top.
pub fn pyramid_budgets(
    num_groups: usize,
    average: usize,
    window: usize,
    beta: f64,
) -> Result<Vec<usize>> {
    let name = || format!("pyramid(average={average}, window={window}, beta={beta})");
    if average <= window {
        return Err(Error::InvalidRetention {
            retention: name(),
            reason: "the average budget must exceed the observation window".into(),
        });
    }
    if !(beta >= 1.0 && beta.is_finite()) {
        return Err(Error::InvalidRetention {
            retention: name(),
            reason: "beta must be a finite number >= 1".into(),
        });
    }
    let span = (average - window) as f64;
    let min = span / beta;
    let max = 2.0 * span - min;
    if num_groups <= 1 {
        return Ok(vec![average; num_groups]);
    }
    let step = (max - min) / (num_groups - 1) as f64;
    Ok((0..num_groups)
        .map(|g| window + (max - step * g as f64).round().max(1.0) as usize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_decrease_and_keep_the_average() {
        let b = pyramid_budgets(10, 256, 32, 20.0).unwrap();
        assert!(b.windows(2).all(|w| w[0] >= w[1]), "{b:?}");
        let mean = b.iter().sum::<usize>() as f64 / b.len() as f64;
        assert!((mean - 256.0).abs() <= 1.0, "{mean}");
        assert!(pyramid_budgets(4, 16, 32, 20.0).is_err());
        assert!(pyramid_budgets(4, 64, 32, 0.5).is_err());
    }
}
