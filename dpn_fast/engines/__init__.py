"""Ways of running a DPN. Each module is one engine with one documented entry point; this
package imports none of them, so the torch host loads without Paddle."""
