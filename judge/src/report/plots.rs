//! The plots of the HTML reports, drawn as inline SVG with `plotters`: ECDFs per arm, the median with its
//! interval against prompt size, and the cumulative fraction of a histogram at its bucket bounds.

use plotters::prelude::*;

use crate::stats::percentile;

/// The level of the median intervals in "TTFT against prompt size".
pub(super) const MEDIAN_ALPHA: f64 = 0.05;

/// The finite values of a sample (the plots and the interval table leave out what cannot be drawn).
pub(super) fn finite(sample: &[f64]) -> Vec<f64> {
    sample.iter().copied().filter(|v| v.is_finite()).collect()
}

const ARM_COLORS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(230, 115, 0)];
/// Most steps drawn of one ECDF: beyond it the steps are taken evenly (the shape is the same).
const MAX_ECDF_STEPS: usize = 400;
/// The size of every plot, in CSS pixels.
const PLOT_SIZE: (u32, u32) = (560, 340);

fn color(arm: usize) -> RGBColor {
    ARM_COLORS.get(arm).copied().unwrap_or(BLACK)
}

/// The ECDF of a sample as the corners of its staircase, from (min, 0) to (max, 1), with at most
/// `MAX_ECDF_STEPS` steps. Empty for an empty sample.
fn ecdf(sample: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = finite(sample);
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    // (x, F(x)) at the last of each run of equal values.
    let steps: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .filter(|&(i, x)| sorted.get(i + 1) != Some(x))
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect();
    let every = steps.len().div_ceil(MAX_ECDF_STEPS).max(1);
    let last = steps.len().saturating_sub(1);
    let mut corners = Vec::with_capacity(2 * MAX_ECDF_STEPS + 2);
    let mut below = 0.0;
    for (i, &(x, f)) in steps.iter().enumerate() {
        if i == 0 || i % every == every - 1 || i == last {
            corners.push((x, below));
            corners.push((x, f));
            below = f;
        }
    }
    corners
}

/// The short line of arm `i`'s colour that stands for its series in the legend.
fn legend_line(i: usize, x: i32, y: i32) -> PathElement<(i32, i32)> {
    PathElement::new(vec![(x, y), (x + 16, y)], color(i).stroke_width(2))
}

/// Every plot's legend: the series labels in a framed, half-transparent box at `position`.
fn draw_legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

type Draw<'a> = Box<
    dyn FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String> + 'a,
>;

/// One SVG drawing, or the reason it could not be drawn.
fn svg(draw: Draw<'_>) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// One ECDF per arm, the x axis from the smallest value to the 99.5th percentile of all (the tail
/// beyond is drawn at the right edge).
pub(super) fn ecdf_plot(
    title: &str,
    x_label: &str,
    arms: &[(String, Vec<f64>)],
) -> Result<String, String> {
    let all: Vec<f64> = arms.iter().flat_map(|(_, v)| finite(v)).collect();
    let (Some(low), Some(high)) = (percentile(&all, 0.0), percentile(&all, 99.5)) else {
        return Err("no samples".into());
    };
    let high = if high > low { high } else { low + 1.0 };
    let title = title.to_string();
    let x_label = x_label.to_string();
    svg(Box::new(move |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d(low..high, 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_desc(x_label)
            .y_desc("fraction of requests")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (arm, sample)) in arms.iter().enumerate() {
            let corners: Vec<(f64, f64)> = ecdf(sample)
                .into_iter()
                .map(|(x, y)| (x.min(high), y))
                .collect();
            chart
                .draw_series(LineSeries::new(corners, color(i).stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("{arm} (n={})", sample.len()))
                .legend(move |(x, y)| legend_line(i, x, y));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
    }))
}

/// One arm's histogram for `binned_cdf_plot`: its name, its request count, and (bound, fraction at or
/// below it) per bucket.
pub type BinnedCdf = (String, f64, Vec<(f64, f64)>);

/// The cumulative fraction per arm of a histogram, known only at its bucket bounds: a point at each
/// bound, joined by straight lines (the true curve passes through the points; between them the data
/// say nothing). Log x axis, as bucket bounds grow geometrically.
pub fn binned_cdf_plot(title: &str, x_label: &str, arms: &[BinnedCdf]) -> Result<String, String> {
    let usable = |points: &[(f64, f64)]| -> Vec<(f64, f64)> {
        points
            .iter()
            .copied()
            .filter(|(x, _)| x.is_finite() && *x > 0.0)
            .collect()
    };
    let bounds: Vec<f64> = arms
        .iter()
        .flat_map(|(_, _, points)| usable(points))
        .map(|(x, _)| x)
        .collect();
    let (Some(first), Some(last)) = (percentile(&bounds, 0.0), percentile(&bounds, 100.0)) else {
        return Err("no bucket with a finite bound".into());
    };
    // The axis spans the bounds where something happens: from the last bound at which every arm is
    // still at 0 to the first at which every arm is at 1.
    let (mut low, mut high) = (last, first);
    for (_, _, points) in arms {
        let points = usable(points);
        let empty_until = points.iter().filter(|(_, f)| *f <= 0.0).map(|(x, _)| *x);
        low = low.min(empty_until.fold(first, f64::max));
        let full_from = points.iter().filter(|(_, f)| *f >= 1.0).map(|(x, _)| *x);
        high = high.max(full_from.fold(last, f64::min));
    }
    let (low, high) = (low / 1.5, if high > low { high * 1.5 } else { low * 2.0 });
    let (title, x_label) = (title.to_string(), x_label.to_string());
    let arms = arms.to_vec();
    svg(Box::new(move |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(48)
            .build_cartesian_2d((low..high).log_scale(), 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc(x_label)
            .y_desc("fraction of requests at or below")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (arm, n, points)) in arms.iter().enumerate() {
            // Points off the axis are pinned to its edges, where their fraction (0 or 1) still holds.
            let points: Vec<(f64, f64)> = points
                .iter()
                .copied()
                .filter(|(x, _)| x.is_finite() && *x > 0.0)
                .map(|(x, f)| (x.clamp(low, high), f))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color(i).stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format!("{arm} (n={n:.0})"))
                .legend(move |(x, y)| legend_line(i, x, y));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color(i).filled())))
                .map_err(|e| e.to_string())?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
    }))
}

/// (median, interval low, interval high) of one arm's sample in one class.
type MedianWithInterval = (f64, f64, f64);
/// A prompt size and, per arm, its median with interval.
pub(super) type MedianRow = (f64, Vec<Option<MedianWithInterval>>);

/// Per arm, the median of `pick`'s finite values with its distribution-free interval at `MEDIAN_ALPHA`.
pub(super) fn medians(
    arms: &[super::experiment::ArmSamples],
    pick: impl Fn(&super::experiment::ArmSamples) -> &Vec<f64>,
) -> Vec<Option<MedianWithInterval>> {
    arms.iter()
        .map(|a| {
            let sample = finite(pick(a));
            let median = percentile(&sample, 50.0)?;
            let (lo, hi) = crate::stats::median_interval(&sample, MEDIAN_ALPHA)?;
            Some((median, lo, hi))
        })
        .collect()
}

/// The x axis of a median plot: its description, the plot title's "by ...", and what is said when no row
/// has a value on it.
pub(super) struct XAxis {
    pub desc: &'static str,
    pub by: &'static str,
    pub missing: &'static str,
}

pub(super) const PROMPT_AXIS: XAxis = XAxis {
    desc: "prompt tokens (log scale)",
    by: "prompt size",
    missing: "no class with a prompt size",
};
pub(super) const CONCURRENCY_AXIS: XAxis = XAxis {
    desc: "requests in flight (log scale)",
    by: "load",
    missing: "no load level",
};
pub(super) const RATE_AXIS: XAxis = XAxis {
    desc: "requests per second (log scale)",
    by: "load",
    missing: "no load level",
};

/// The median with its distribution-free interval against the x axis (log scale), per arm.
pub(super) fn median_plot(
    metric: &str,
    arms: &[String],
    rows: &[MedianRow],
    axis: &XAxis,
) -> Result<String, String> {
    let sizes: Vec<f64> = rows.iter().map(|(x, _)| *x).collect();
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|(_, per_arm)| per_arm.iter().flatten().flat_map(|&(_, lo, hi)| [lo, hi]))
        .collect();
    let (Some(x_min), Some(x_max)) = (percentile(&sizes, 0.0), percentile(&sizes, 100.0)) else {
        return Err(axis.missing.into());
    };
    let (Some(y_min), Some(y_max)) = (percentile(&values, 0.0), percentile(&values, 100.0)) else {
        return Err("no samples (or too few for a median interval)".into());
    };
    let (x_low, x_high) = (x_min / 1.6, x_max * 1.6);
    let pad = ((y_max - y_min) * 0.1).max(1.0);
    let (y_low, y_high) = ((y_min - pad).max(0.0), y_max + pad);
    let title = format!(
        "{metric} median and {:.0} % interval by {}",
        100.0 * (1.0 - MEDIAN_ALPHA),
        axis.by
    );
    let x_label = axis.desc;
    let y_label = format!("{metric} ms");
    let arms = arms.to_vec();
    let rows = rows.to_vec();
    svg(Box::new(move |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d((x_low..x_high).log_scale(), y_low..y_high)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(242, 242, 242))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, arm) in arms.iter().enumerate() {
            // The arms side by side at each size, so that their bars do not hide each other.
            let offset = if i == 0 { 0.96 } else { 1.04 };
            let points: Vec<(f64, MedianWithInterval)> = rows
                .iter()
                .filter_map(|(x, per_arm)| Some((x * offset, per_arm.get(i).copied().flatten()?)))
                .collect();
            let style = color(i).stroke_width(2);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|&(x, (m, _, _))| (x, m)),
                    style,
                ))
                .map_err(|e| e.to_string())?
                .label(arm.clone())
                .legend(move |(x, y)| legend_line(i, x, y));
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, (m, lo, hi))| ErrorBar::new_vertical(x, lo, m, hi, style, 8)),
                )
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|&(x, (m, _, _))| Circle::new((x, m), 3, color(i).filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_ecdf_is_a_staircase_from_zero_to_one() {
        assert_eq!(
            ecdf(&[2.0, 1.0, 2.0, f64::NAN]),
            vec![(1.0, 0.0), (1.0, 1.0 / 3.0), (2.0, 1.0 / 3.0), (2.0, 1.0)]
        );
        assert!(ecdf(&[]).is_empty());
        let many: Vec<f64> = (0..10_000).map(f64::from).collect();
        let corners = ecdf(&many);
        assert!(corners.len() <= 2 * MAX_ECDF_STEPS + 2);
        assert_eq!(corners.first(), Some(&(0.0, 0.0)));
        assert_eq!(corners.last(), Some(&(9999.0, 1.0)));
    }
}
