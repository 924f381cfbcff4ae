//! What the pod and the metrics say about a cell: its id, type, launch type, price, address.

use std::net::IpAddr;

/// What the cell condition says about a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellSummary {
    /// The backend's id.
    pub id: String,
    /// Instance type.
    pub instance_type: String,
    /// `on-demand` or `spot`.
    pub launch_type: String,
    /// Hourly price, if the catalog knows the type.
    pub price_per_hour: Option<f64>,
    /// Currency of the price.
    pub currency: String,
    /// The agent's address.
    pub management_ip: Option<IpAddr>,
}

impl CellSummary {
    /// `cell i-0123 (10.0.0.5): t3.small on-demand, 0.0208 USD/h`.
    pub fn describe(&self) -> String {
        let address = self
            .management_ip
            .map_or(String::new(), |ip| format!(" ({ip})"));
        let price = self.price_per_hour.map_or_else(
            || "price unknown".to_owned(),
            |p| format!("{p:.4} {}/h", self.currency),
        );
        format!(
            "cell {}{address}: {} {}, {price}",
            self.id, self.instance_type, self.launch_type
        )
    }
}
