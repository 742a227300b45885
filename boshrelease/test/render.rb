#!/usr/bin/env ruby
# Renders one job template the way a BOSH director would, without a director: a stand-in for
# BOSH's template renderer, used by tests/boshrelease.rs.
#
#   render.rb JOB_DIR TEMPLATE [--properties FILE] [--spec FILE] [--link NAME=FILE]...
#   render.rb JOB_DIR --provided-link NAME [--properties FILE] [--spec FILE]
#
# JOB_DIR is a job (jobs/locker) and TEMPLATE a file under its templates/. FILE is YAML (or JSON,
# which is YAML): --properties holds a manifest's job properties, nested as in a manifest
# (locker: {port: 1234}); --spec overrides fields of `spec` (address, index, deployment, ...);
# --link gives a consumed link: {properties: {...}, instances: [{address: ...}], address: ...}.
# --provided-link prints, as JSON, the link this job provides under NAME, as a consumer would see
# it through --link.
#
# Like BOSH: properties are the job spec's defaults overlaid with the given ones; p(name) raises
# for an unset property without default, p(name, fallback) returns the fallback; if_p yields only
# when every named property is set and returns an object with .else; ERB trim mode is '-'.
# Stricter than BOSH: a given property the job spec does not declare is an error (BOSH drops it),
# so a typo in a test or manifest fails loudly.

require 'erb'
require 'json'
require 'ostruct'
require 'yaml'

module Render
  class UnknownProperty < StandardError; end

  # Looks a dotted name up in nested hashes; nil when any step is missing.
  def self.lookup(hash, name)
    name.split('.').reduce(hash) do |node, key|
      return nil unless node.is_a?(Hash) && node.key?(key)
      node[key]
    end
  end

  def self.assign(hash, name, value)
    *parents, last = name.split('.')
    node = parents.reduce(hash) { |n, key| n[key] ||= {} }
    node[last] = value
  end

  # Every dotted leaf name in nested hashes (a hash value counts as a leaf when a declared
  # property names it, e.g. a property whose value is a map).
  def self.leaves(hash, declared, prefix = nil)
    hash.flat_map do |key, value|
      name = prefix ? "#{prefix}.#{key}" : key.to_s
      if value.is_a?(Hash) && !declared.include?(name)
        leaves(value, declared, name)
      else
        [name]
      end
    end
  end

  # The job spec's property defaults overlaid with the given properties, nested.
  def self.merge_properties(job_spec, given)
    declared = job_spec.fetch('properties', {}) || {}
    unknown = leaves(given, declared.keys) - declared.keys
    unless unknown.empty?
      raise UnknownProperty, "properties not declared in the job spec: #{unknown.join(', ')}"
    end
    merged = {}
    declared.each do |name, definition|
      value = lookup(given, name)
      value = (definition || {})['default'] if value.nil?
      assign(merged, name, value) unless value.nil?
    end
    merged
  end

  # Result of if_p / if_link: runs the .else block when the condition did not hold.
  class Conditional
    def initialize(taken)
      @taken = taken
    end

    def else
      yield unless @taken
    end
  end

  # Property accessors shared by the template context and links.
  module Properties
    def p(*args)
      names = Array(args[0])
      names.each do |name|
        value = Render.lookup(@properties, name)
        return value unless value.nil?
      end
      return args[1] if args.length == 2
      raise UnknownProperty, "can't find property '#{names.join("' or '")}'"
    end

    def if_p(*names)
      values = names.map { |name| Render.lookup(@properties, name) }
      return Conditional.new(false) if values.any?(&:nil?)
      yield(*values)
      Conditional.new(true)
    end
  end

  class Link
    include Properties
    attr_reader :instances, :address

    def initialize(definition)
      @properties = definition.fetch('properties', {}) || {}
      @instances = (definition.fetch('instances', []) || []).map { |i| OpenStruct.new(i) }
      @address = definition['address'] || @instances.first&.address
    end
  end

  class Context
    include Properties
    attr_reader :spec

    def initialize(properties, spec, links)
      @properties = properties
      @spec = spec
      @links = links
    end

    def link(name)
      @links.fetch(name) { raise UnknownProperty, "can't find link '#{name}'" }
    end

    def if_link(name)
      return Conditional.new(false) unless @links.key?(name)
      yield @links[name]
      Conditional.new(true)
    end

    def render(template)
      ERB.new(template, trim_mode: '-').result(binding)
    end
  end

  DEFAULT_SPEC = {
    'address' => '10.0.0.5',
    'ip' => '10.0.0.5',
    'az' => 'z1',
    'bootstrap' => true,
    'deployment' => 'locker',
    'id' => 'b7a5c2de-0a16-4a5e-9a31-5a0c1a1e7b01',
    'index' => 0,
    'name' => 'locker',
    'networks' => { 'default' => { 'ip' => '10.0.0.5', 'default' => %w[dns gateway] } },
    'persistent_disk' => 1024,
    'release' => { 'name' => 'locker', 'version' => '0+dev.1' },
  }.freeze

  def self.load_yaml(path)
    YAML.safe_load(File.read(path), aliases: false) || {}
  end

  def self.main(argv)
    job_dir = argv.shift or abort(usage)
    options = { links: {} }
    template = nil
    until argv.empty?
      arg = argv.shift
      case arg
      when '--properties' then options[:properties] = load_yaml(argv.shift)
      when '--spec' then options[:spec] = load_yaml(argv.shift)
      when '--link'
        name, file = argv.shift.to_s.split('=', 2)
        abort(usage) unless name && file
        options[:links][name] = load_yaml(file)
      when '--provided-link' then options[:provided] = argv.shift or abort(usage)
      else
        abort(usage) if template || arg.start_with?('--')
        template = arg
      end
    end

    job_spec = load_yaml(File.join(job_dir, 'spec'))
    properties = merge_properties(job_spec, options.fetch(:properties, {}) || {})
    spec = DEFAULT_SPEC.merge('name' => job_spec['name']).merge(options.fetch(:spec, {}) || {})

    if options[:provided]
      puts JSON.pretty_generate(provided_link(job_spec, properties, spec, options[:provided]))
      return
    end

    abort(usage) unless template
    declared = job_spec.fetch('templates', {}) || {}
    unless declared.key?(template)
      raise ArgumentError, "#{template} is not listed under templates: in #{job_dir}/spec"
    end
    links = options[:links].transform_values { |definition| Link.new(definition) }
    context = Context.new(properties, OpenStruct.new(spec), links)
    print context.render(File.read(File.join(job_dir, 'templates', template)))
  end

  # What a consumer of the job's link NAME sees: the properties the spec lists, with their
  # values, and this instance.
  def self.provided_link(job_spec, properties, spec, name)
    provides = (job_spec['provides'] || []).find { |l| l['name'] == name }
    raise ArgumentError, "the job provides no link named #{name}" unless provides
    values = {}
    (provides['properties'] || []).each do |property|
      value = lookup(properties, property)
      assign(values, property, value) unless value.nil?
    end
    instance = spec.slice('address', 'az', 'bootstrap', 'id', 'index', 'name')
    { 'properties' => values, 'instances' => [instance], 'address' => spec['address'] }
  end

  def self.usage
    "usage: #{$PROGRAM_NAME} JOB_DIR TEMPLATE [--properties FILE] [--spec FILE] [--link NAME=FILE]...\n" \
      "       #{$PROGRAM_NAME} JOB_DIR --provided-link NAME [--properties FILE] [--spec FILE]"
  end
end

begin
  Render.main(ARGV.dup)
rescue Render::UnknownProperty, ArgumentError, RuntimeError => e
  warn "render: #{e.message}"
  exit 1
end
