//! Latency distributions as a self-contained SVG (or an HTML page holding it): one
//! panel per workload, one CDF line per run (direct, buffered, fio), the latency on
//! a log axis and the percentile on a tail-stretching axis (50, 90, 99, 99.9, 99.99).

use std::fmt::Write as _;
use std::path::Path;

use crate::fail::Failure;

/// One line of a panel: its name and its CDF as (latency ns, fraction at or below).
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

/// One workload's panel.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

const PANEL_W: f64 = 480.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 130.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;
/// The y axis reaches p99.99: -log10(1 - 0.9999).
const Y_MAX: f64 = 4.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn color(name: &str, i: usize) -> &'static str {
    if name.ends_with("direct") {
        COLORS[0]
    } else if name.ends_with("buffered") {
        COLORS[1]
    } else if name.ends_with("fio") {
        COLORS[2]
    } else {
        COLORS[(i + 3) % COLORS.len()]
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Percentile fraction to the y axis value (0 at p0, 1 at p90, 2 at p99, ...).
fn tail(p: f64) -> f64 {
    (-(1.0 - p).max(1e-6).log10()).clamp(0.0, Y_MAX)
}

fn label_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{} ms", us / 1000.0)
    } else {
        format!("{us} us")
    }
}

/// The SVG document.
pub fn svg(title: &str, panels: &[Panel]) -> String {
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let width = PANEL_W * cols as f64;
    let height = 40.0 + PANEL_H * rows as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text class="title" x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let x0 = PANEL_W * (i % cols) as f64;
        let y0 = 40.0 + PANEL_H * (i / cols) as f64;
        draw_panel(&mut s, panel, x0, y0);
    }
    s.push_str("</svg>\n");
    s
}

fn draw_panel(s: &mut String, panel: &Panel, x0: f64, y0: f64) {
    let pw = PANEL_W - LEFT - RIGHT;
    let ph = PANEL_H - TOP - BOTTOM;
    let (px, py) = (x0 + LEFT, y0 + TOP);
    // The x range: whole decades of microseconds around every point.
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for p in panel.series.iter().flat_map(|s| &s.points) {
        let us = (p.0 as f64 / 1000.0).max(0.1);
        lo = lo.min(us);
        hi = hi.max(us);
    }
    if lo > hi {
        (lo, hi) = (1.0, 10.0);
    }
    let (dlo, mut dhi) = (lo.log10().floor(), hi.log10().ceil());
    if dhi <= dlo {
        dhi = dlo + 1.0;
    }
    // Coordinates to a tenth of a pixel: shorter files, same picture.
    let tenth = |v: f64| (v * 10.0).round() / 10.0;
    let x = |us: f64| tenth(px + (us.max(0.1).log10() - dlo) / (dhi - dlo) * pw);
    let y = |v: f64| tenth(py + ph - v / Y_MAX * ph);
    let _ = writeln!(
        s,
        r#"<g class="panel" data-workload="{}">"#,
        escape(&panel.title)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
        px + pw / 2.0,
        y0 + 18.0,
        escape(&panel.title)
    );
    // Axes, grid and ticks.
    let _ = writeln!(s, r##"<g class="axis" stroke="#444" fill="#222">"##);
    let _ = writeln!(
        s,
        r#"<line class="x-axis" x1="{px}" y1="{}" x2="{}" y2="{}"/>"#,
        py + ph,
        px + pw,
        py + ph
    );
    let _ = writeln!(
        s,
        r#"<line class="y-axis" x1="{px}" y1="{py}" x2="{px}" y2="{}"/>"#,
        py + ph
    );
    let mut d = dlo;
    while d <= dhi {
        let xv = x(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{xv}" y1="{py}" x2="{xv}" y2="{}" stroke="#ddd"/><text x="{xv}" y="{}" text-anchor="middle" stroke="none">{}</text>"##,
            py + ph,
            py + ph + 14.0,
            label_us(10f64.powf(d))
        );
        d += 1.0;
    }
    for (v, name) in [
        (0.0, "0"),
        (std::f64::consts::LOG10_2, "50"),
        (1.0, "90"),
        (2.0, "99"),
        (3.0, "99.9"),
        (4.0, "99.99"),
    ] {
        let yv = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{yv}" x2="{}" y2="{yv}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end" stroke="none">{name}</text>"##,
            px + pw,
            px - 4.0,
            yv + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" stroke="none">latency (log)</text>"#,
        px + pw / 2.0,
        py + ph + 32.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" stroke="none" transform="rotate(-90 {} {})">percentile</text>"#,
        x0 + 14.0,
        py + ph / 2.0,
        x0 + 14.0,
        py + ph / 2.0
    );
    s.push_str("</g>\n");
    // One line per run, and its legend entry.
    for (i, series) in panel.series.iter().enumerate() {
        let c = color(&series.name, i);
        let mut pts = String::new();
        for &(ns, p) in &series.points {
            let _ = write!(pts, "{:.1},{:.1} ", x(ns as f64 / 1000.0), y(tail(p)));
        }
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-run="{} {}" fill="none" stroke="{c}" stroke-width="1.8" points="{}"/>"#,
            escape(&panel.title),
            escape(&series.name),
            pts.trim_end()
        );
        let ly = py + 10.0 + 18.0 * i as f64;
        let lx = px + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<g class="legend"><line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text></g>"#,
            lx + 18.0,
            lx + 22.0,
            ly + 4.0,
            escape(&series.name)
        );
    }
    s.push_str("</g>\n");
}

/// Write the plot to `path`: an HTML page holding the SVG if the name ends in
/// `.html` or `.htm`, else the SVG itself.
pub fn write(path: &Path, title: &str, panels: &[Panel]) -> Result<(), Failure> {
    let svg = svg(title, panels);
    let html = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
    let text = if html {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head><body>\n{svg}</body></html>\n",
            escape(title)
        )
    } else {
        svg
    };
    std::fs::write(path, text).map_err(|e| Failure::at(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_polyline_per_series_and_balanced_groups() {
        let panels = vec![Panel {
            title: "randread 4k qd32".into(),
            series: vec![
                Series {
                    name: "direct".into(),
                    points: vec![(50_000, 0.5), (90_000, 0.99)],
                },
                Series {
                    name: "buffered".into(),
                    points: vec![(60_000, 0.5), (2_000_000, 0.999)],
                },
            ],
        }];
        let s = svg("t & <t>", &panels);
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<g").count(), s.matches("</g>").count());
        assert!(s.contains("t &amp; &lt;t&gt;"));
        assert!((tail(0.99) - 2.0).abs() < 1e-9);
    }
}
