//! SVG plots of the results (plotters, SVG backend only: text stays `<text>` elements, so no
//! font or bitmap libraries are needed). Every plot is drawn, measured or not, and its `<svg>`
//! carries an id (`plot-...`) the report test looks for.

use plotters::prelude::*;

use crate::model::{key, Figure, Kind, Results};
use crate::stats::Summary;
use crate::{Error, Result};

/// One plot: its id, title and SVG text.
pub struct Plot {
    pub id: &'static str,
    pub title: String,
    pub svg: String,
}

/// A bar: label and the summary, or why there is none.
pub type Bar = (String, Result2);
type Result2 = std::result::Result<Summary, String>;

fn bar(label: &str, f: Option<&Figure>) -> Bar {
    let s = match f {
        Some(f) => f.summary().copied().ok_or_else(|| f.brief()),
        None => Err("not run".into()),
    };
    (label.to_string(), s)
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Render("plot", e.to_string())
}

/// A bar chart: the median as the bar, min to max as a whisker. With `log`, the y axis is
/// logarithmic (drawn as log10 of the values on a linear axis, labelled with the values), for
/// figures that span orders of magnitude such as start times.
pub fn bar_chart(id: &'static str, title: &str, unit: &str, bars: &[Bar], log: bool) -> Result<Plot> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let measured = || bars.iter().filter_map(|(_, s)| s.as_ref().ok());
        let max = measured().map(|s| s.max).fold(0.0, f64::max);
        let min_pos = measured().map(|s| s.min).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let (y0, ymax) = match (log, max > 0.0) {
            (true, true) => (min_pos.log10().floor() - 0.3, max.log10().ceil() + 0.2),
            (false, true) => (0.0, max * 1.15),
            (_, false) => (0.0, 1.0),
        };
        let y = |v: f64| if log { v.max(1e-9).log10().max(y0) } else { v };
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d((0..n - 1).into_segmented(), y0..ymax)
            .map_err(err)?;
        let label = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        };
        let y_label = |v: &f64| crate::model::num(if log { 10f64.powf(*v) } else { *v });
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&label)
            .y_labels(if log { ((ymax - y0).ceil() as usize + 1).max(2) } else { 10 })
            .y_label_formatter(&y_label)
            .y_desc(if log { format!("{unit} (log scale)") } else { unit.to_string() })
            .draw()
            .map_err(err)?;
        for (i, (_, s)) in bars.iter().enumerate() {
            match s {
                Ok(s) => {
                    let mut r = Rectangle::new(
                        [(SegmentValue::Exact(i), y0), (SegmentValue::Exact(i + 1), y(s.median))],
                        Palette99::pick(i).mix(0.75).filled(),
                    );
                    r.set_margin(0, 0, 18, 18);
                    chart.draw_series(std::iter::once(r)).map_err(err)?;
                    let c = SegmentValue::CenterOf(i);
                    let whisker =
                        PathElement::new(vec![(c.clone(), y(s.min)), (c.clone(), y(s.max))], BLACK.stroke_width(2));
                    chart.draw_series(std::iter::once(whisker)).map_err(err)?;
                    let text = crate::model::num(s.median);
                    chart
                        .draw_series(std::iter::once(Text::new(text, (c, y(s.max.max(s.median))), ("sans-serif", 13))))
                        .map_err(err)?;
                }
                Err(reason) => {
                    let text: String = reason.chars().take(40).collect();
                    let at: (SegmentValue<usize>, f64) = (SegmentValue::Exact(i), y0 + (ymax - y0) * 0.05);
                    chart.draw_series(std::iter::once(Text::new(text, at, ("sans-serif", 11)))).map_err(err)?;
                }
            }
        }
        root.present().map_err(err)?;
    }
    Ok(Plot { id, title: title.to_string(), svg: svg.replacen("<svg ", &format!("<svg id=\"{id}\" "), 1) })
}

/// Every subject's figure under `key` (isla's kinds and the peers).
fn subjects(r: &Results, k: &str) -> Vec<Bar> {
    r.subjects.iter().map(|s| bar(&s.name, s.figure(k))).collect()
}

/// The host baseline, then isla's kinds.
fn against_host(r: &Results, k: &str) -> Vec<Bar> {
    let mut v = vec![bar("host", r.baseline(k))];
    for kind in Kind::ALL {
        if let Some(s) = r.isla(kind) {
            v.push(bar(kind.name(), s.figure(k)));
        }
    }
    v
}

/// All the report's plots.
pub fn all(r: &Results) -> Result<Vec<Plot>> {
    let mut latency = Vec::new();
    for (k, p) in [(key::HTTP_P50, "p50"), (key::HTTP_P90, "p90"), (key::HTTP_P99, "p99")] {
        for (label, s) in against_host(r, k) {
            latency.push((format!("{label} {p}"), s));
        }
    }
    let host = |k| against_host(r, k);
    Ok(vec![
        bar_chart("plot-start", "Start time (command to workload ready)", "ms", &subjects(r, key::START), true)?,
        bar_chart("plot-memory", "Base memory of one idle instance (Pss)", "KiB", &subjects(r, key::MEMORY), true)?,
        bar_chart(
            "plot-density",
            "Density: instances per memory budget (projected)",
            "instances",
            &subjects(r, key::DENSITY_PROJECTED),
            false,
        )?,
        bar_chart("plot-cpu", "CPU: sysbench prime", "events/s", &host(key::CPU), false)?,
        bar_chart("plot-disk-read", "Disk: fio sequential read", "KiB/s", &host(key::DISK_SEQ_READ), true)?,
        bar_chart("plot-disk-write", "Disk: fio sequential write", "KiB/s", &host(key::DISK_SEQ_WRITE), true)?,
        bar_chart("plot-disk-random", "Disk: fio random read 4k", "IOPS", &host(key::DISK_RAND_READ), true)?,
        bar_chart("plot-net", "Network: iperf3", "Mbit/s", &host(key::NET), true)?,
        bar_chart("plot-http-rps", "Web service: requests per second", "req/s", &host(key::HTTP_RPS), true)?,
        bar_chart("plot-http-latency", "Web service: latency percentiles", "ms", &latency, true)?,
    ])
}

/// The ids `all` draws, in order (the report test checks each).
pub const IDS: [&str; 10] = [
    "plot-start",
    "plot-memory",
    "plot-density",
    "plot-cpu",
    "plot-disk-read",
    "plot-disk-write",
    "plot-disk-random",
    "plot-net",
    "plot-http-rps",
    "plot-http-latency",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_bars_and_reasons() {
        let s = Summary::of(&[10.0, 12.0, 30.0]).unwrap();
        let bars = [("one".to_string(), Ok(s)), ("two".to_string(), Err("failed: no kvm".to_string()))];
        let p = bar_chart("plot-x", "A title", "ms", &bars, false).unwrap();
        assert!(p.svg.starts_with("<svg id=\"plot-x\" "), "{}", &p.svg[..80]);
        assert!(p.svg.contains("A title") && p.svg.contains("one") && p.svg.contains("failed: no kvm"));
        assert!(p.svg.contains("<rect"), "a bar is drawn");
        let log = bar_chart("plot-l", "Log", "ms", &bars[..1], true).unwrap();
        assert!(log.svg.contains("ms (log scale)") && log.svg.contains("<rect"));
        let empty = bar_chart("plot-y", "Nothing", "ms", &[], true).unwrap();
        assert!(empty.svg.contains("id=\"plot-y\""));
    }
}
