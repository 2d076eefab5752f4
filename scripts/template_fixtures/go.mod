module template_fixtures

go 1.19
