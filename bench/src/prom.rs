//! Reading Prometheus text exposition (the relay's `/metrics`): just enough to look a
//! series up by name and labels.

use std::collections::BTreeMap;

/// Looks a value up in Prometheus text. `query` is a metric name with optional labels,
/// `name{label="value",...}`; every series of that name whose labels include the given
/// ones matches, and their values are summed. `None` when no series matches.
pub fn metric_value(text: &str, query: &str) -> Option<f64> {
    let (name, wanted, _) = parse_series(query.trim())?;
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((n, labels, rest)) = parse_series(line) else {
            continue;
        };
        if n != name || !wanted.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let Some(value) = rest.split_whitespace().next().and_then(parse_prom_float) else {
            continue;
        };
        *found.get_or_insert(0.0) += value;
    }
    found
}

fn parse_prom_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        s => s.parse().ok(),
    }
}

/// `name{k="v",...} rest` → (name, labels, rest).
fn parse_series(s: &str) -> Option<(&str, BTreeMap<String, String>, &str)> {
    let end = s
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(s.len());
    let (name, mut rest) = s.split_at(end);
    if name.is_empty() {
        return None;
    }
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            while chars
                .peek()
                .is_some_and(|(_, c)| *c == ',' || c.is_whitespace())
            {
                chars.next();
            }
            let &(start, c) = chars.peek()?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
    }
    Some((name, labels, rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    const TEXT: &str = "# HELP x y\n\
        relay_input_events_total{outcome=\"delivered\"} 7\n\
        relay_input_events_total{outcome=\"refused_view_only\"} 2\n\
        relay_sessions_active 3\n\
        weird{a=\"q\\\"uote\",b=\"2\"} +Inf\n";

    #[test]
    fn sums_matching_series() {
        assert_eq!(metric_value(TEXT, "relay_input_events_total"), Some(9.0));
        assert_eq!(
            metric_value(TEXT, "relay_input_events_total{outcome=\"delivered\"}"),
            Some(7.0)
        );
        assert_eq!(metric_value(TEXT, "relay_sessions_active"), Some(3.0));
        assert_eq!(metric_value(TEXT, "weird{b=\"2\"}"), Some(f64::INFINITY));
    }

    #[test]
    fn absent_series_is_none() {
        assert_eq!(metric_value(TEXT, "relay_missing"), None);
        assert_eq!(
            metric_value(TEXT, "relay_input_events_total{outcome=\"malformed\"}"),
            None
        );
    }
}
