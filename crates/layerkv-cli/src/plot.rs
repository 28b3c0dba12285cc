//! PNG charts for reports: a matrix heatmap ([`heatmap`], KVSharer's layer distances) and
//! named curves ([`line_chart`], e.g. NLL along a long stream), drawn with `plotters`' bitmap
//! backend.
//!
//! Text needs a font, and the build needs none: on first use the process registers DejaVu Sans,
//! taken from Debian's `fonts-dejavu-core` package fetched into the layerkv cache dir (or, when
//! that fails, the system's copy of the same file). Without a font the chart is still written,
//! without any text (no title, labels or legend), after one warning; no path through this
//! module panics on bad data: empty or non-finite input is an error or is drawn in grey.
//!
//! Cost: O(cells) or O(points) drawing into a `width x height` RGB buffer, one PNG encode.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

/// The Debian package and the file in it that provide the chart font.
const FONT_PACKAGE: &str = "fonts-dejavu-core";
const FONT_MEMBER: &str = "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Image size of every chart.
const SIZE: (u32, u32) = (1000, 800);

/// Registers the font once per process; whether text can be drawn.
fn fonts_available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| match load_font() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("no font for charts ({e:#}); charts are drawn without text");
            false
        }
    })
}

fn load_font() -> Result<()> {
    let path = match layerkv_model::assets::ensure_debian_file(FONT_PACKAGE, FONT_MEMBER) {
        Ok(p) => p,
        Err(e) => {
            let system = Path::new("/").join(FONT_MEMBER);
            if !system.exists() {
                return Err(anyhow!("fetching {FONT_PACKAGE}: {e}"));
            }
            system
        }
    };
    let bytes = std::fs::read(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // plotters keeps fonts for the whole process: leaking the one buffer is the intended use.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))
}

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// Writes `matrix` (rows x columns, e.g. layer x layer) as a heatmap PNG at `path`: row 0 at
/// the bottom (origin lower left, like the axes), a Viridis colour scale from the smallest to the largest finite value, with a colour
/// bar; non-finite cells are grey. `axis_label` names both axes (e.g. "layer").
pub fn heatmap(path: &Path, matrix: &[Vec<f64>], title: &str, axis_label: &str) -> Result<()> {
    heatmap_with(path, matrix, title, axis_label, None, fonts_available())
}

/// [`heatmap`] on a fixed colour scale `lo..hi` (values outside are clamped): accuracies on
/// `0..1`, so an all-right grid is the top colour, not the middle of an auto range.
pub fn heatmap_in(
    path: &Path,
    matrix: &[Vec<f64>],
    title: &str,
    axis_label: &str,
    (lo, hi): (f64, f64),
) -> Result<()> {
    heatmap_with(
        path,
        matrix,
        title,
        axis_label,
        Some((lo, hi)),
        fonts_available(),
    )
}

fn heatmap_with(
    path: &Path,
    matrix: &[Vec<f64>],
    title: &str,
    axis_label: &str,
    range: Option<(f64, f64)>,
    text: bool,
) -> Result<()> {
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 {
        bail!("heatmap {}: the matrix is empty", path.display());
    }
    if let Some(r) = matrix.iter().position(|row| row.len() != cols) {
        bail!(
            "heatmap {}: row {r} has {} entries, row 0 has {cols}",
            path.display(),
            matrix[r].len()
        );
    }
    let finite = matrix.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if let Some((a, b)) = range.filter(|&(a, b)| a < b) {
        (a, b)
    } else if lo > hi {
        (0.0, 1.0)
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let err = draw_err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (main, bar) = root.split_horizontally(SIZE.0 - 140);
    let mut builder = ChartBuilder::on(&main);
    builder.margin(20);
    if text {
        builder
            .caption(title, ("sans-serif", 26))
            .x_label_area_size(45)
            .y_label_area_size(55);
    }
    // Cell (c, r) spans [c, c + 1) x [r, r + 1); ticks sit at the cells' lower edges, labelled
    // with their index. (Segmented axes drew nothing for a single row or column.)
    let mut chart = builder
        .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)
        .map_err(&err)?;
    if text {
        let index = |v: &f64| {
            if v.fract().abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(axis_label)
            .y_desc(axis_label)
            .x_labels((cols + 1).min(17))
            .y_labels((rows + 1).min(17))
            .x_label_formatter(&index)
            .y_label_formatter(&index)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(&err)?;
    }
    let colour = |v: f64| -> RGBColor {
        if v.is_finite() {
            ViridisRGB.get_color_normalized(v.clamp(lo, hi) as f32, lo as f32, hi as f32)
        } else {
            RGBColor(160, 160, 160)
        }
    };
    chart
        .draw_series(matrix.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &v)| {
                let (x, y) = (c as f64, r as f64);
                Rectangle::new([(x, y), (x + 1.0, y + 1.0)], colour(v).filled())
            })
        }))
        .map_err(&err)?;
    // Colour bar: 100 steps from lo (bottom) to hi (top).
    let mut bar_builder = ChartBuilder::on(&bar);
    bar_builder
        .margin_top(60)
        .margin_bottom(65)
        .margin_right(20);
    if text {
        bar_builder.y_label_area_size(70);
    }
    let mut scale = bar_builder
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(&err)?;
    if text {
        scale
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(&err)?;
    }
    let step = (hi - lo) / 100.0;
    scale
        .draw_series((0..100).map(|i| {
            let v0 = lo + step * i as f64;
            Rectangle::new(
                [(0.0, v0), (1.0, v0 + step)],
                colour(v0 + step / 2.0).filled(),
            )
        }))
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Writes named curves as a line chart PNG at `path`: one colour per entry of `series`
/// (`(name, points)` with points as `(x, y)`, drawn in the given order; series of at most 64
/// points also get a marker per point), axes spanning every finite point, a legend with the
/// names. Non-finite points are left out (the curve breaks
/// there). Fails only when no series has a finite point or the file cannot be written.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    line_chart_with(path, title, x_label, y_label, series, fonts_available())
}

fn line_chart_with(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    text: bool,
) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points = series.iter().flat_map(|(_, pts)| pts.iter().filter(finite));
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        bail!(
            "line chart {}: no series has a finite point",
            path.display()
        );
    }
    let widen = |lo: f64, hi: f64| {
        if lo == hi {
            let pad = (lo.abs() * 0.05).max(0.5);
            (lo - pad, hi + pad)
        } else {
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        }
    };
    let (x0, x1) = if x0 == x1 { widen(x0, x1) } else { (x0, x1) };
    let (y0, y1) = widen(y0, y1);
    let err = draw_err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(25);
    if text {
        builder
            .caption(title, ("sans-serif", 26))
            .x_label_area_size(50)
            .y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(&err)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if text {
        mesh.x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 18));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(&err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(1.0);
        let style = color.stroke_width(2);
        // Split at non-finite points so a gap stays a gap.
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for p in pts {
            if finite(&p) {
                if let Some(s) = segments.last_mut() {
                    s.push(*p);
                }
            } else if segments.last().is_some_and(|s| !s.is_empty()) {
                segments.push(Vec::new());
            }
        }
        // Short series also get markers, so a single point still shows.
        if pts.len() <= 64 {
            chart
                .draw_series(
                    pts.iter()
                        .filter(finite)
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )
                .map_err(&err)?;
        }
        let mut first = true;
        for seg in segments.into_iter().filter(|s| !s.is_empty()) {
            let drawn = chart
                .draw_series(LineSeries::new(seg, style))
                .map_err(&err)?;
            if text && first {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            first = false;
        }
    }
    if text && !series.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_size(path: &Path) -> (u32, u32) {
        let file = std::fs::File::open(path).unwrap();
        let reader = png::Decoder::new(file).read_info().unwrap();
        let info = reader.info();
        (info.width, info.height)
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("layerkv-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn matrix() -> Vec<Vec<f64>> {
        (0..6)
            .map(|i| (0..6).map(|j| (i as f64 - j as f64).abs()).collect())
            .collect()
    }

    #[test]
    fn heatmap_writes_a_png_with_and_without_text() {
        for text in [false, true] {
            if text && !fonts_available() {
                continue; // no font on this machine: the text-free path is tested above
            }
            let path = tmp(&format!("heat-{text}.png"));
            let mut m = matrix();
            m[2][3] = f64::NAN;
            heatmap_with(&path, &m, "distances", "layer", None, text).unwrap();
            assert_eq!(png_size(&path), SIZE);
        }
        let path = tmp("heat-one.png");
        heatmap_with(&path, &[vec![0.0]], "one layer", "layer", None, false).unwrap();
        assert_eq!(png_size(&path), SIZE);
        let path = tmp("heat-public.png");
        heatmap(&path, &matrix(), "distances", "layer").unwrap();
        assert_eq!(png_size(&path), SIZE);
    }

    /// Pixels of `path` (RGB or RGBA) equal to `rgb`.
    fn count_colour(path: &Path, rgb: RGBColor) -> usize {
        let file = std::fs::File::open(path).unwrap();
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let channels = info.color_type.samples();
        buf[..info.buffer_size()]
            .chunks(channels)
            .filter(|p| p[0] == rgb.0 && p[1] == rgb.1 && p[2] == rgb.2)
            .count()
    }

    /// A single column (one context length, several depths: the needle grid's usual shape) is
    /// drawn: its lowest and highest cells' colours cover a cell's area each.
    ///
    /// Seen failing with the segmented axes: the PNG held no pixel of either colour.
    #[test]
    fn a_single_column_heatmap_draws_its_cells() {
        let path = tmp("heat-column.png");
        heatmap_with(
            &path,
            &[vec![0.0], vec![1.0], vec![0.5]],
            "t",
            "l",
            None,
            false,
        )
        .unwrap();
        let low = ViridisRGB.get_color_normalized(0.0, 0.0, 1.0);
        let high = ViridisRGB.get_color_normalized(1.0, 0.0, 1.0);
        for c in [low, high] {
            let n = count_colour(&path, c);
            assert!(n > 10_000, "{n} pixels of {c:?}");
        }
    }

    /// On a fixed 0..1 scale an all-right accuracy grid is the top colour, and values outside
    /// the scale are clamped. Seen failing with the auto range (a constant grid took the middle
    /// colour: 0 pixels of the top one).
    #[test]
    fn a_fixed_scale_puts_a_constant_grid_at_its_value() {
        let path = tmp("heat-fixed.png");
        let m = [vec![1.0], vec![1.0], vec![1.0]];
        heatmap_with(&path, &m, "t", "l", Some((0.0, 1.0)), false).unwrap();
        let top = ViridisRGB.get_color_normalized(1.0, 0.0, 1.0);
        let n = count_colour(&path, top);
        assert!(n > 30_000, "{n} pixels of {top:?}");
        let path = tmp("heat-clamped.png");
        heatmap_with(
            &path,
            &[vec![-1.0], vec![2.0]],
            "t",
            "l",
            Some((0.0, 1.0)),
            false,
        )
        .unwrap();
        let low = ViridisRGB.get_color_normalized(0.0, 0.0, 1.0);
        for c in [low, top] {
            let n = count_colour(&path, c);
            assert!(n > 10_000, "{n} pixels of {c:?}");
        }
    }

    #[test]
    fn line_chart_writes_a_png_with_and_without_text() {
        let series = vec![
            (
                "identity".to_string(),
                (0..50).map(|i| (i as f64, (i as f64).sqrt())).collect(),
            ),
            (
                "shared".to_string(),
                (0..50)
                    .map(|i| (i as f64, if i == 20 { f64::NAN } else { 1.0 }))
                    .collect(),
            ),
            ("flat".to_string(), vec![(3.0, 2.0)]),
        ];
        for text in [false, true] {
            if text && !fonts_available() {
                continue;
            }
            let path = tmp(&format!("line-{text}.png"));
            line_chart_with(&path, "nll", "tokens", "nats", &series, text).unwrap();
            assert_eq!(png_size(&path), SIZE);
        }
        let path = tmp("line-public.png");
        line_chart(&path, "nll", "tokens", "nats", &series).unwrap();
        assert_eq!(png_size(&path), SIZE);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let path = tmp("bad.png");
        assert!(heatmap_with(&path, &[], "t", "l", None, false).is_err());
        assert!(heatmap_with(&path, &[vec![1.0], vec![]], "t", "l", None, false).is_err());
        let nan = vec![("x".to_string(), vec![(f64::NAN, 1.0)])];
        assert!(line_chart_with(&path, "t", "x", "y", &nan, false).is_err());
        assert!(line_chart_with(&path, "t", "x", "y", &[], false).is_err());
        let unwritable = Path::new("/nonexistent-dir/x.png");
        assert!(heatmap_with(unwritable, &matrix(), "t", "l", None, false).is_err());
    }
}
