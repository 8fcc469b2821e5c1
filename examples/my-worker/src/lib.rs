//! This worker's tasks. Each is an async function from a [`TaskContext`]
//! (the Celery message's args, kwargs and metadata) to a JSON value, or a
//! [`TaskError`] that says what to do: fail (recorded with an exception
//! type, as Python's would be), retry later, or reject the message.

use serde::Deserialize;
use serde_json::{Value, json};
use taskstack::worker::{Registry, TaskContext, TaskError, TaskOptions};

/// Registers this worker's tasks (called once at start).
pub fn register(registry: &mut Registry) {
    registry.register_with("invoices.render", TaskOptions::default(), render_invoice);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Invoice {
    number: String,
    currency: String,
    #[serde(default)]
    tax_rate_percent: u32,
    lines: Vec<Line>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    description: String,
    quantity: u32,
    /// In the currency's smallest unit (cents), so no float ever rounds.
    unit_price: u64,
}

/// `invoices.render(invoice)`: totals an invoice and renders it as text.
/// Returns `{"number", "currency", "subtotal", "tax", "total", "text"}`
/// (amounts in cents). A malformed invoice fails with `ValueError` naming
/// what is wrong; it is not retried.
pub async fn render_invoice(ctx: TaskContext) -> Result<Value, TaskError> {
    let [invoice] = ctx.args.as_slice() else {
        return Err(TaskError::fail(
            "TypeError",
            format!(
                "invoices.render takes one argument (the invoice), got {}",
                ctx.args.len()
            ),
        ));
    };
    let invoice: Invoice = serde_json::from_value(invoice.clone())
        .map_err(|e| TaskError::fail("ValueError", format!("invalid invoice: {e}")))?;
    if invoice.lines.is_empty() {
        return Err(TaskError::fail(
            "ValueError",
            format!("invoice {} has no lines", invoice.number),
        ));
    }
    let mut subtotal: u64 = 0;
    let mut text = format!("Invoice {}\n", invoice.number);
    for line in &invoice.lines {
        let amount = u64::from(line.quantity)
            .checked_mul(line.unit_price)
            .and_then(|a| subtotal.checked_add(a).map(|s| (a, s)))
            .ok_or_else(|| TaskError::fail("OverflowError", "invoice amount too large"))?;
        subtotal = amount.1;
        text.push_str(&format!(
            "{:>4} x {:<30} {:>12}\n",
            line.quantity,
            line.description,
            money(amount.0, &invoice.currency)
        ));
    }
    // Half up, in cents.
    let tax = (subtotal * u64::from(invoice.tax_rate_percent) + 50) / 100;
    let total = subtotal + tax;
    text.push_str(&format!(
        "Subtotal {}\nTax {}% {}\nTotal {}\n",
        money(subtotal, &invoice.currency),
        invoice.tax_rate_percent,
        money(tax, &invoice.currency),
        money(total, &invoice.currency)
    ));
    Ok(json!({
        "number": invoice.number,
        "currency": invoice.currency,
        "subtotal": subtotal,
        "tax": tax,
        "total": total,
        "text": text,
    }))
}

fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn call(args: Vec<Value>) -> Result<Value, TaskError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(render_invoice(TaskContext::new(
            "invoices.render",
            args,
            Map::new(),
        )))
    }

    #[test]
    fn an_invoice_is_totalled_with_tax_and_rendered() {
        let out = call(vec![json!({
            "number": "INV-7", "currency": "EUR", "tax_rate_percent": 20,
            "lines": [
                {"description": "Hosting", "quantity": 2, "unit_price": 1250},
                {"description": "Support", "quantity": 1, "unit_price": 999}
            ]
        })])
        .expect("renders");
        assert_eq!(out["subtotal"], 3499);
        assert_eq!(out["tax"], 700);
        assert_eq!(out["total"], 4199);
        let text = out["text"].as_str().expect("text");
        assert!(text.contains("Invoice INV-7"), "{text}");
        assert!(text.contains("Total 41.99 EUR"), "{text}");
    }

    #[test]
    fn a_malformed_invoice_fails_with_what_is_wrong() {
        let e = call(vec![json!({"number": "INV-8", "currency": "EUR"})]).expect_err("no lines");
        assert!(format!("{e:?}").contains("missing field `lines`"), "{e:?}");
        let e = call(vec![]).expect_err("no argument");
        assert!(format!("{e:?}").contains("got 0"), "{e:?}");
        let e = call(vec![
            json!({"number": "INV-9", "currency": "EUR", "lines": []}),
        ])
        .expect_err("empty");
        assert!(format!("{e:?}").contains("has no lines"), "{e:?}");
    }

    #[test]
    fn the_task_is_registered_under_its_celery_name() {
        let mut r = Registry::new();
        register(&mut r);
        assert_eq!(r.names(), ["invoices.render"]);
    }
}
