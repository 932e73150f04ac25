"""Affiliate postbacks (issue 15): postbacks that affiliates keep in the store, fenced by the
policy file `rules.d/affiliates.yaml`, managed through :class:`AffiliateService`."""
