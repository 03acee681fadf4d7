//! The status page: one HTML file with its style and script inline, so it
//! works on a host without internet access. It fetches `/cluster` and
//! `/events` (with the browser's sign-in cookie when a token is set) every
//! two seconds and draws them; it holds no data itself.

pub const PAGE: &str = include_str!("status_page.html");

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for outside in ["http://", "https://", "//cdn", "src=\"/", "@import"] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        assert!(
            PAGE.contains("fetch(url"),
            "the page reads the admin endpoint"
        );
    }
}
