"""HTTP only: parse requests, call the domain, format responses."""
